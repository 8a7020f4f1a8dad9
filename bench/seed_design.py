"""The "seed design" peer, for the benchmark only: synchronous per-layer copies in forward
pre-hooks, and the positive and negative CFG branches run as separate passes.

This is how the first offloading VibeVoice packs work (PEERS.md): each streamed layer's
weights sit in pinned host buffers; a forward pre-hook copies them to the GPU and
synchronises before the layer runs, a forward hook drops the device copy. Running the two
CFG branches as separate passes makes every streamed layer cross the link twice per frame
(m = 2), and the synchronisation leaves no overlap between copies and compute.
"""

from __future__ import annotations

import torch
from torch import nn

from vibevoice_offload.decoder_pass import DecoderPass
from vibevoice_offload.executor import ResidentExecutor
from vibevoice_offload.frame_loop import FrameLoop


class SeedHooks:
    """Pre-hook: pinned host weights -> fresh device tensors, then synchronise; post-hook: drop them."""

    def __init__(self, layers: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.host: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        self.handles = []
        for layer in layers:
            params = []
            for p in layer.parameters():
                pinned = p.data.pin_memory()  # per tensor, as the seed did
                p.data = pinned
                params.append((p, pinned))
            self.host[id(layer)] = params
            self.handles.append(layer.register_forward_pre_hook(self._pre))
            self.handles.append(layer.register_forward_hook(self._post))

    def _pre(self, module, args):
        for p, pinned in self.host[id(module)]:
            p.data = pinned.to(self.device, non_blocking=True)
        torch.cuda.synchronize(self.device)

    def _post(self, module, args, output):
        for p, pinned in self.host[id(module)]:
            p.data = pinned
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class SeedDecoderPass(DecoderPass):
    """Each CFG branch passes through all layers on its own (m = 2), eagerly."""

    def step(self, embeds):
        return torch.cat([self.run_rows([(row, embeds)]) for row in range(self.cache.rows)])


class SeedLoop(FrameLoop):
    """Our frame loop with the seed's decoder passes."""

    decoder_pass = SeedDecoderPass


def seed_executor(model: nn.Module) -> ResidentExecutor:
    """The seed placed everything it did not stream on the GPU and ran the model where it is."""
    executor = ResidentExecutor(model)
    executor._device = torch.device("cuda", torch.cuda.current_device())
    return executor

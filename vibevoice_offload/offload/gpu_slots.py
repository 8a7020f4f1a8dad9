"""A fixed ring of GPU slots that streamed decoder layers are copied into.

Each slot owns one flat device buffer. For bf16 streaming it is laid out as the layer's
NATIVE slab layout (sized for the largest streamed layer: all Qwen2 layers are equal) and
backs a "slot module": a decoder-layer module built once from the model's own layer
structure whose parameters are views into that buffer. Running streamed layer i means: its
slab was copied into the slot, set `slot.module.self_attn.layer_idx = i` (the KV cache
index), call the module.

For staged streaming (fp8, bf16-packed) a slot is only a staging buffer (the layer's
encoded slab bytes): the H2D copy lands there, and the weights are decoded on the GPU
(`dequant.py`), on a stream of their own, into one of the plan's `compute_buffers`
model-dtype compute buffers. With two the next layer's decoding is queued while the
current one computes, so it can run as soon as its copy lands (on the H100 it then takes
turns with the layers on the GPU rather than overlapping them: it is free only while the
layers wait for the link); one saves a layer of VRAM and decodes each layer only after
the previous one ran. A layer's decoding is a dozen kernels
launched from Python; on CUDA each (compute buffer, staging slot) pair's is
captured as a CUDA graph the second time it is used and replayed after that, one launch a
layer. (On the H100 this did not move the 1.5B fp8 row it was meant for: that frame is
bound by the ring's depth, not by the host.)

Encoded residents (`OffloadPlan.encoded_residents`): a resident layer kept packed on the
GPU is a "fixed" slot, filled once, never copied into again, and decoded into the compute
buffers each pass like the staging slots.

Nothing here allocates after construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..cuda_graphs import GraphPool
from .dequant import DequantOp, dequant_ops, dequantise
from .host_slabs import NATIVE, SlabLayout, point_layer

def make_shell(template: nn.Module) -> nn.Module:
    """A structural copy of `template` whose tensors are on the meta device (no data copied)."""
    memo: dict[int, object] = {}
    for p in template.parameters(recurse=True):
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    for b in template.buffers(recurse=True):
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return copy.deepcopy(template, memo)


def _layer_module(template: nn.Module, native: SlabLayout, buffer: torch.Tensor) -> nn.Module:
    module = make_shell(template)
    point_layer(module, native, buffer)
    return module


@dataclass
class Slot:
    """One ring slot: the device buffer a streamed layer's host slab is copied into."""

    index: int
    buffer: torch.Tensor  # flat uint8: NATIVE layout (bf16 streaming) or a staged format's layout
    module: nn.Module | None  # bf16: the layer module running from `buffer`; staged: None
    layer: int | None = None  # the layer whose copy was last issued into this slot
    copy_done: torch.cuda.Event | None = None  # recorded on the copy stream once the slot holds `layer`
    # Recorded when the slot may be overwritten: bf16, on the compute stream after `layer`
    # ran; staged, on the dequantisation stream after `layer` was decoded out of it.
    free: torch.cuda.Event | None = None


@dataclass
class ComputeBuffer:
    """Staged streaming: a model-dtype layer buffer and module that staged layers are decoded into."""

    buffer: torch.Tensor  # flat uint8, NATIVE layout
    module: nn.Module
    ops: list[list[DequantOp]]  # per staging slot: the ops that dequantise it into `buffer`
    ready: torch.cuda.Event | None = None  # recorded on the dequantisation stream when the layer is in `buffer`
    free: torch.cuda.Event | None = None  # recorded on the compute stream after the layer in `buffer` ran


def ring_nbytes(native_bytes: int, staged_bytes: int | None, depth: int, compute_buffers: int, decodes_residents: bool = False) -> int:
    """Device bytes of a ring of `depth` slots: bf16 (`staged_bytes` None), `depth` layer-sized
    slots; staged, `depth` staging slots of `staged_bytes` plus `compute_buffers` layer-sized
    compute buffers, which encoded residents need even with nothing streamed (`depth` 0).
    (The fixed slots of encoded residents are counted as resident layers, not here.)"""
    if depth == 0 and not decodes_residents:
        return 0
    return depth * native_bytes if staged_bytes is None else compute_buffers * native_bytes + depth * staged_bytes


class SlotRing:
    """`depth` slots on `device` that host slabs are copied into.

    bf16 (NATIVE) streaming: each slot is a compute slot with its own slot module; the layer
    runs straight from the slot it was copied into.

    Staged streaming: each slot is only a staging buffer (fp8: half a layer, bf16-packed:
    three quarters), and the layers run from `compute_buffers` shared compute buffers that
    the engine decodes into, in turn. A staging slot is free as soon as its layer is
    decoded, so the copy stream never waits for compute: the ring runs `depth` layers ahead
    for a fraction of a layer per slot.
    """

    def __init__(
        self, template: nn.Module, native: SlabLayout, stream: SlabLayout, depth: int, compute_buffers: int, device: torch.device,
        fixed: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """`fixed`: encoded residents, layer -> its device buffer in the `stream` layout,
        already filled on the current stream (the ring records that as their "copy done")."""
        fixed = fixed or {}
        if depth < 1 and not fixed:
            raise ValueError("a slot ring needs at least one slot")
        self.staged = stream.format != NATIVE
        if fixed and not self.staged:
            raise ValueError("encoded residents need a staged stream layout")
        if self.staged:
            self.slots = [Slot(i, torch.empty(stream.nbytes, dtype=torch.uint8, device=device), None) for i in range(depth)]
            self.fixed = {layer: Slot(depth + k, buffer, None, layer) for k, (layer, buffer) in enumerate(sorted(fixed.items()))}
            self.computes: list[ComputeBuffer] = []
            for _ in range(compute_buffers):
                buffer = torch.empty(native.nbytes, dtype=torch.uint8, device=device)
                ops = [dequant_ops(native, stream, buffer, slot.buffer) for slot in (*self.slots, *self.fixed.values())]
                self.computes.append(ComputeBuffer(buffer, _layer_module(template, native, buffer), ops))
        else:
            self.slots = []
            self.fixed = {}
            for i in range(depth):
                buffer = torch.empty(native.nbytes, dtype=torch.uint8, device=device)
                self.slots.append(Slot(i, buffer, _layer_module(template, native, buffer)))
            self.computes = []
        if device.type == "cuda":
            for slot in (*self.slots, *self.fixed.values()):
                slot.copy_done, slot.free = torch.cuda.Event(), torch.cuda.Event()
            for slot in self.fixed.values():
                slot.copy_done.record()
            for compute in self.computes:
                compute.ready, compute.free = torch.cuda.Event(), torch.cuda.Event()
        self._graphs = GraphPool(device) if self.staged and device.type == "cuda" else None
        self._capture = self._graphs is not None
        self._dequant_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._dequantised: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        """The rotating slots (the fixed ones are never copied into)."""
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        """The ring's own buffers: the fixed slots belong to the resident layers."""
        return sum(s.buffer.numel() for s in self.slots) + sum(c.buffer.numel() for c in self.computes)

    def dequantise(self, compute: int, slot: Slot) -> None:
        """Enqueue on the current stream the dequantisation of staging slot `slot` into compute
        buffer `compute`: eagerly the first time a pair is used (it also loads the kernels),
        from its graph after that."""
        key = (compute, slot.index)
        ops = self.computes[compute].ops[slot.index]
        graph = self._dequant_graphs.get(key)
        if graph is None and self._capture and key in self._dequantised:
            captured = self._graphs.capture(lambda: dequantise(ops))
            if captured is None:
                self._capture = False  # an op that cannot be captured: stay eager, still correct
            else:
                graph = self._dequant_graphs[key] = captured[0]
        if graph is not None:
            graph.replay()
        else:
            dequantise(ops)
            self._dequantised.add(key)

    def close(self) -> None:
        self._dequant_graphs.clear()
        if self._graphs is not None:
            self._graphs.release()
            self._graphs = None
        self.slots.clear()
        self.fixed.clear()
        self.computes.clear()

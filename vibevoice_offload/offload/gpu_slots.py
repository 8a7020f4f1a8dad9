"""A fixed ring of GPU slots that streamed decoder layers are copied into.

Each slot owns one flat device buffer. For bf16 streaming it is laid out as the layer's
NATIVE slab layout (sized for the largest streamed layer: all Qwen2 layers are equal) and
backs a "slot module": a decoder-layer module built once from the model's own layer
structure whose parameters are views into that buffer. Running streamed layer i means: its
slab was copied into the slot, set `slot.module.self_attn.layer_idx = i` (the KV cache
index), call the module.

For staged streaming (fp8, bf16-packed) a slot is a staging buffer (the layer's encoded
slab bytes): the H2D copy lands there and the weights are decoded on the GPU
(`dequant.py`) into model-dtype memory, in one of two ways (the plan's `compute_buffers`):

- 2, decoded a layer ahead: two layer-sized compute buffers, each with its own layer
  module, that the layers are decoded into in turn on a stream of their own, so the next
  layer's decoding is queued while the current one computes and runs as soon as its copy
  lands (on the H100 it then takes turns with the layers on the GPU rather than
  overlapping them: it is free only while the layers wait for the link). A layer's
  decoding is a dozen kernels launched from Python; on CUDA each (compute buffer, staging
  slot) pair's is captured as a CUDA graph the second time it is used and replayed after
  that, one launch a layer.
- 1, decoded on use: the slot has a slot module like bf16's, whose biases and norms are
  views into the staging buffer and whose `nn.Linear`s are `DecodedLinear`s: each decodes
  its weight into ONE buffer the size of the layer's largest weight, shared by every slot,
  on the compute stream right before its matmul. The same GPU work as decoding a whole
  layer before it runs (the layer waits for its decoding either way), in a weight's VRAM
  instead of a layer's: Large 136 MB instead of 466 MB, a packed layer more resident at
  every budget. The decoding is part of the layer, so the decoder pass's CUDA graphs
  replay it.

Encoded residents (`OffloadPlan.encoded_residents`): a resident layer kept packed on the
GPU is a "fixed" slot, filled once, never copied into again, and decoded like the staging
slots.

Nothing here allocates after construction.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..cuda_graphs import GraphPool
from .dequant import DequantOp, Fp8Op, PackedOp, dequant_op, dequant_ops, dequantise
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


class DecodedLinear(nn.Module):
    """An `nn.Linear` of a decoded-on-use slot module: `forward` first decodes the weight from
    its staging slot into `weight` (a view of the ring's shared weight buffer), on the
    current stream, so the decoding is ordered after the previous weight's matmul and
    before this one's without an event."""

    def __init__(self, decode: Fp8Op | PackedOp, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.decode = decode
        self.weight = decode.dst  # a plain attribute: the module owns no parameter of its own
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dequantise([self.decode])
        return F.linear(x, self.weight, self.bias)


def weight_buffer_nbytes(native: SlabLayout, stream: SlabLayout) -> int:
    """Bytes of the shared weight buffer of decoding on use: the layer's largest encoded
    weight, in the model dtype."""
    encoded = {e.name for e in stream.entries if e.role == "q"}
    return max((e.nbytes for e in native.entries if e.name in encoded), default=0)


def _decoding_module(template: nn.Module, native: SlabLayout, stream: SlabLayout, staging: torch.Tensor, weights: torch.Tensor) -> nn.Module:
    """A layer module that runs from staging buffer `staging` (the `stream` layout): biases
    and norms are views into it, each encoded weight's `nn.Linear` a `DecodedLinear` that
    decodes into `weights`."""
    module = make_shell(template)
    point_layer(module, stream, staging)
    decoded = native.by_name()
    for entry in stream.entries:
        if entry.role != "q":
            continue
        parent_name, _, child = entry.name.removesuffix(".weight").rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        out = dataclasses.replace(decoded[entry.name], offset=0).view(weights)
        setattr(parent, child, DecodedLinear(dequant_op(stream, entry.name, out, staging), getattr(parent, child).bias))
    return module


@dataclass
class Slot:
    """One ring slot: the device buffer a streamed layer's host slab is copied into."""

    index: int
    buffer: torch.Tensor  # flat uint8: NATIVE layout (bf16 streaming) or a staged format's layout
    # The layer module running from `buffer`: bf16, and staged decoded on use; None when
    # staged layers are decoded ahead (they run from a compute buffer's module).
    module: nn.Module | None
    copy_done: torch.cuda.Event | None = None  # recorded on the copy stream once the slot holds its layer
    # Recorded when the slot may be overwritten: on the compute stream after its layer ran;
    # decoded ahead, on the dequantisation stream after its layer was decoded out of it.
    free: torch.cuda.Event | None = None


@dataclass
class ComputeBuffer:
    """Staged streaming: a model-dtype layer buffer and module that staged layers are decoded into."""

    buffer: torch.Tensor  # flat uint8, NATIVE layout
    module: nn.Module
    ops: list[list[DequantOp]]  # per staging slot: the ops that dequantise it into `buffer`
    ready: torch.cuda.Event | None = None  # recorded on the dequantisation stream when the layer is in `buffer`
    free: torch.cuda.Event | None = None  # recorded on the compute stream after the layer in `buffer` ran


def ring_nbytes(
    native_bytes: int, staged_bytes: int | None, depth: int, compute_buffers: int, decodes_residents: bool = False,
    weight_bytes: int = 0,
) -> int:
    """Device bytes of a ring of `depth` slots: bf16 (`staged_bytes` None), `depth` layer-sized
    slots; staged, `depth` staging slots of `staged_bytes` plus what the layers are decoded
    into: with 2 `compute_buffers` two layer-sized buffers, with 1 the shared weight buffer
    (`weight_bytes`, `weight_buffer_nbytes`); encoded residents need that even with nothing
    streamed (`depth` 0). (The fixed slots of encoded residents are counted as resident
    layers, not here.)"""
    if depth == 0 and not decodes_residents:
        return 0
    if staged_bytes is None:
        return depth * native_bytes
    return (weight_bytes if compute_buffers == 1 else compute_buffers * native_bytes) + depth * staged_bytes


class SlotRing:
    """`depth` slots on `device` that host slabs are copied into.

    bf16 (NATIVE) streaming: each slot is a compute slot with its own slot module; the layer
    runs straight from the slot it was copied into.

    Staged streaming: each slot is a staging buffer (fp8: half a layer, bf16-packed: three
    quarters). With two `compute_buffers` the layers run from two shared compute buffers
    that the engine decodes into, in turn (`decodes_ahead`), and a staging slot is free as
    soon as its layer is decoded; with one each slot has a slot module that decodes its
    weights on use into the shared `weight_buffer`, and is free once its layer ran, as
    bf16's. Either way the ring runs `depth` layers ahead for a fraction of a layer per slot.
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
        staged = stream.format != NATIVE
        if fixed and not staged:
            raise ValueError("encoded residents need a staged stream layout")
        self.computes: list[ComputeBuffer] = []
        self.weight_buffer: torch.Tensor | None = None  # decoding on use: the weight being used
        if staged:
            self.slots = [Slot(i, torch.empty(stream.nbytes, dtype=torch.uint8, device=device), None) for i in range(depth)]
            self.fixed = {layer: Slot(depth + k, buffer, None) for k, (layer, buffer) in enumerate(sorted(fixed.items()))}
            sources = (*self.slots, *self.fixed.values())
            if compute_buffers == 1:
                self.weight_buffer = torch.empty(weight_buffer_nbytes(native, stream), dtype=torch.uint8, device=device)
                for slot in sources:
                    slot.module = _decoding_module(template, native, stream, slot.buffer, self.weight_buffer)
            else:
                for _ in range(compute_buffers):
                    buffer = torch.empty(native.nbytes, dtype=torch.uint8, device=device)
                    ops = [dequant_ops(native, stream, buffer, slot.buffer) for slot in sources]
                    self.computes.append(ComputeBuffer(buffer, _layer_module(template, native, buffer), ops))
        else:
            self.slots = []
            self.fixed = {}
            for i in range(depth):
                buffer = torch.empty(native.nbytes, dtype=torch.uint8, device=device)
                self.slots.append(Slot(i, buffer, _layer_module(template, native, buffer)))
        if device.type == "cuda":
            for slot in (*self.slots, *self.fixed.values()):
                slot.copy_done, slot.free = torch.cuda.Event(), torch.cuda.Event()
            for slot in self.fixed.values():
                # The engine's device, which need not be the current one: its packed copy was
                # enqueued on that device's current stream.
                slot.copy_done.record(torch.cuda.current_stream(device))
            for compute in self.computes:
                compute.ready, compute.free = torch.cuda.Event(), torch.cuda.Event()
        self._graphs = GraphPool(device) if self.decodes_ahead and device.type == "cuda" else None
        self._capture = self._graphs is not None
        self._dequant_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._dequantised: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        """The rotating slots (the fixed ones are never copied into)."""
        return len(self.slots)

    @property
    def decodes_ahead(self) -> bool:
        """Staged layers are decoded into the compute buffers before they run (two
        `compute_buffers`), not by their slot module as they run."""
        return bool(self.computes)

    @property
    def nbytes(self) -> int:
        """The ring's own buffers: the fixed slots belong to the resident layers."""
        weights = self.weight_buffer.numel() if self.weight_buffer is not None else 0
        return sum(s.buffer.numel() for s in self.slots) + sum(c.buffer.numel() for c in self.computes) + weights

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
        self.weight_buffer = None

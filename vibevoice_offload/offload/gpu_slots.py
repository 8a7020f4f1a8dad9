"""A fixed ring of GPU slots that streamed decoder layers are copied into.

Each slot owns one flat device buffer laid out as the layer's NATIVE slab layout (sized
for the largest streamed layer: all Qwen2 layers are equal), and a "slot module": a
decoder-layer module built once from the model's own layer structure whose parameters
are views into that buffer. Running streamed layer i means: its slab was copied into the
slot, set `slot.module.self_attn.layer_idx = i` (the KV cache index), call the module.

For fp8 streaming a slot is an fp8 staging buffer (the layer's fp8 slab bytes): the H2D
copy lands there and the weights are dequantised on the GPU into one shared model-dtype
compute buffer (`out.copy_(q); out.mul_(scale[:, None])`: two in-place kernels per
linear, no temporary allocation), on the compute stream just before the layer runs.

Nothing here allocates after construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .host_slabs import FP8, NATIVE, HostLayer, SlabLayout, point_layer


def make_shell(template: nn.Module) -> nn.Module:
    """A structural copy of `template` whose tensors are on the meta device (no data copied)."""
    memo: dict[int, object] = {}
    for p in template.parameters(recurse=True):
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    for b in template.buffers(recurse=True):
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return copy.deepcopy(template, memo)


@dataclass
class Slot:
    index: int
    buffer: torch.Tensor  # flat uint8, NATIVE layout, on the device
    staging: torch.Tensor | None  # flat uint8, FP8 layout (fp8 streaming only)
    module: nn.Module
    ops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (dst, src, row scale) per staged tensor
    layer: int | None = None  # the layer whose copy was last issued into this slot
    copy_done: object | None = None  # event recorded on the copy stream when the slot holds `layer`
    free: object | None = None  # event recorded on the compute stream when `layer` was last used
    timing: list = field(default_factory=list)



def upload_ops(native: SlabLayout, stream: SlabLayout, dst: torch.Tensor, staging: torch.Tensor) -> list:
    """Per tensor: (destination view in `dst`, source view in `staging`, row scales or None)."""
    src = stream.by_name()
    ops = []
    for entry in native.entries:
        s = src[entry.name]
        scale = src[entry.name + ".__scale"].view(staging)[:, None] if s.role == "q" else None
        ops.append((entry.view(dst), s.view(staging), scale))
    return ops


def run_ops(ops: list) -> None:
    for dst, src, scale in ops:
        dst.copy_(src)
        if scale is not None:
            dst.mul_(scale)


def upload(host: HostLayer, dst: torch.Tensor, staging: torch.Tensor | None, ops: list | None) -> None:
    """Enqueue `host` into `dst` on the current stream (H2D copy; fp8: then dequantise on the device)."""
    if host.format == NATIVE:
        dst[: host.nbytes].copy_(host.slab, non_blocking=True)
        return
    assert staging is not None and ops is not None
    staging[: host.nbytes].copy_(host.slab, non_blocking=True)
    run_ops(ops)


def ring_nbytes(native_bytes: int, staged_bytes: int | None, depth: int) -> int:
    """Device bytes of a ring of `depth` slots: bf16 (`staged_bytes` None), `depth` layer-sized
    slots; fp8, `depth` staging slots of `staged_bytes` plus one shared compute buffer."""
    if depth == 0:
        return 0
    return depth * native_bytes if staged_bytes is None else native_bytes + depth * staged_bytes


class SlotRing:
    """`depth` slots on `device` that host slabs are copied into.

    bf16 (NATIVE) streaming: each slot is a compute slot with its own slot module; the layer
    runs straight from the slot it was copied into.

    fp8 streaming: each slot is only an fp8 staging buffer (half a layer), and ONE shared
    compute buffer + module holds the dequantised layer. The dequantisation is enqueued on
    the compute stream right before the layer runs (an in-order stream needs one compute
    buffer), so the copy stream never waits for compute to free a model-dtype slot: the
    ring can run `depth` layers ahead for half the bytes per slot.
    """

    def __init__(self, template: nn.Module, native: SlabLayout, stream: SlabLayout, depth: int, device: torch.device) -> None:
        if depth < 1:
            raise ValueError("a slot ring needs at least one slot")
        self.native, self.stream_layout, self.device = native, stream, device
        self.staged = stream.format == FP8
        self.slots: list[Slot] = []
        self.compute: torch.Tensor | None = None
        self.compute_module: nn.Module | None = None
        if self.staged:
            self.compute = torch.empty(native.nbytes, dtype=torch.uint8, device=device)
            self.compute_module = make_shell(template)
            point_layer(self.compute_module, native, self.compute)
        for i in range(depth):
            if self.staged:
                staging = torch.empty(stream.nbytes, dtype=torch.uint8, device=device)
                ops = upload_ops(native, stream, self.compute, staging)
                self.slots.append(Slot(i, self.compute, staging, self.compute_module, ops))
            else:
                buffer = torch.empty(native.nbytes, dtype=torch.uint8, device=device)
                module = make_shell(template)
                point_layer(module, native, buffer)
                self.slots.append(Slot(i, buffer, None, module, None))

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        if self.staged:
            return self.compute.numel() + sum(s.staging.numel() for s in self.slots)
        return sum(s.buffer.numel() for s in self.slots)

    def fill(self, slot: Slot, host: HostLayer) -> None:
        """Enqueue the H2D copy of `host` into `slot` (fp8: into its staging buffer only)."""
        dst = slot.staging if slot.staging is not None else slot.buffer
        dst[: host.nbytes].copy_(host.slab, non_blocking=True)

    def close(self) -> None:
        for slot in self.slots:
            slot.module = None  # type: ignore[assignment]
            slot.ops = []
            slot.copy_done = slot.free = None
        self.slots.clear()
        self.compute = self.compute_module = None

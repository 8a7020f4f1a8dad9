"""Dequantising a staged fp8 decoder layer into a model-dtype buffer, on the device.

Per linear weight: out = fp8 weight x float32 row scale, rounded once to the model dtype;
the layer's other tensors (biases, norms) are copied as they are. On CUDA a fused Triton
kernel does a weight in one pass (one read of the fp8 bytes, one write of the result): a
Large layer takes 0.38 ms on an H100 against 1.75 ms for torch's two in-place kernels
(`copy_` then `mul_`, which read and write the model-dtype layer twice), with identical
bits (bench/results/NVIDIA-H100-80GB-HBM3-20261127-dequant-Large.json). That GPU time
matters even on a side stream: it competes with the decoder layers for memory bandwidth.
Triton is used where it is installed and passes a self-check on the device (Windows
installs often lack it); otherwise, and on a CPU, the torch kernels.
"""

from __future__ import annotations

import functools
import logging

import torch

from .host_slabs import SlabLayout

log = logging.getLogger(__name__)

DequantOp = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(destination view, source view, float32 row scales for an fp8 weight, else None)."""

_BLOCK = 4096  # columns per Triton program


def dequant_ops(native: SlabLayout, stream: SlabLayout, dst: torch.Tensor, staging: torch.Tensor) -> list[DequantOp]:
    """The ops that turn `staging` (a layer in the `stream` layout) into `dst` (NATIVE layout)."""
    src = stream.by_name()
    ops = []
    for entry in native.entries:
        s = src[entry.name]
        scale = src[entry.name + ".__scale"].view(staging) if s.role == "q" else None
        ops.append((entry.view(dst), s.view(staging), scale))
    return ops


def dequantise(ops: list[DequantOp], *, fused_kernel: bool = True) -> None:
    """Enqueue `ops` on the current stream (nothing is allocated); `fused_kernel=False` forces
    the torch kernels (to compare the two)."""
    fused = _fused_kernel(ops[0][0].device) if ops and fused_kernel else None
    for dst, src, scale in ops:
        if scale is None:
            dst.copy_(src)
        elif fused is not None:
            fused(src, scale, dst)
        else:
            dst.copy_(src)
            dst.mul_(scale[:, None])


@functools.cache
def _fused_kernel(device: torch.device):
    """The Triton kernel as `fn(q, scale, out)` if it compiles and matches torch on `device`, else None."""
    if device.type != "cuda":
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        log.info("triton is not installed: fp8 layers are dequantised with torch kernels (slower)")
        return None

    @triton.jit
    def kernel(q_ptr, scale_ptr, out_ptr, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < cols
        q = tl.load(q_ptr + row * cols + offsets, mask=mask).to(tl.float32)
        scale = tl.load(scale_ptr + row)
        tl.store(out_ptr + row * cols + offsets, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)

    def fused(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        rows, cols = q.shape
        kernel[(rows, triton.cdiv(cols, _BLOCK))](q, scale, out, cols, BLOCK=_BLOCK)

    try:  # a GPU or Triton build without fp8 conversions must not produce wrong weights
        with torch.cuda.device(device):
            weight = torch.randn(64, 5000, device=device)
            scale = weight.abs().amax(dim=1) / 448
            q = (weight / scale[:, None]).to(torch.float8_e4m3fn)
            expected = q.to(torch.bfloat16).mul_(scale[:, None])
            got = torch.empty_like(expected)
            fused(q, scale, got)
            if not torch.equal(got, expected):
                raise RuntimeError("result differs from torch's")
    except Exception as exc:  # noqa: BLE001 - any failure means: use the torch kernels
        log.warning("fused fp8 dequantisation unavailable on %s (%s): using torch kernels", device, exc)
        return None
    return fused

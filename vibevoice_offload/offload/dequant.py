"""Decoding a staged decoder layer into a model-dtype buffer, on the device.

Two staged formats (`host_slabs.STAGED_FORMATS`), each weight decoded by one fused Triton
kernel on CUDA (one read of the staged bytes, one write of the result), the layer's other
tensors (biases, norms) copied as they are:

- fp8: out = fp8 weight x float32 row scale, rounded once to the model dtype. A Large layer
  takes 0.38 ms on an H100 against 1.75 ms for torch's two in-place kernels (`copy_` then
  `mul_`, which read and write the model-dtype layer twice), with identical bits
  (bench/results/NVIDIA-H100-80GB-HBM3-20261127-dequant-Large.json). That GPU time matters
  even on a side stream: it competes with the decoder layers for memory bandwidth.
- bf16-packed (`bf16_packing`): each element's high byte from its 4-bit code and the
  tensor's base, joined to its stored low byte; then a second small kernel writes the
  exceptions' high bytes. Bit for bit the bf16 weight.

Triton is used where it is installed and passes a self-check on the device (Windows
installs often lack it). Without it fp8 uses torch's in-place kernels; bf16-packed has no
allocation-free torch decoder, so the engine refuses it on such a GPU
(`require_packed_kernel`). On a CPU both use the torch reference decoders.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..bf16_packing import PackedBf16, pack_bf16, unpack_bf16
from .host_slabs import FP8, PACKED, SlabLayout, packed_weight

log = logging.getLogger(__name__)

_BLOCK = 4096  # elements (fp8: columns of one row) per Triton program
_PACKED_PAIRS = 4096  # bf16-packed: element pairs (code bytes) per program, 8 warps: the fastest of 512-4096 x 4-8 on an H100


@dataclass(frozen=True)
class CopyOp:
    """A tensor stored as it is used (bias, norm)."""

    dst: torch.Tensor
    src: torch.Tensor


@dataclass(frozen=True)
class Fp8Op:
    dst: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor  # float32, one per row


@dataclass(frozen=True)
class PackedOp:
    dst: torch.Tensor
    packed: PackedBf16


DequantOp = CopyOp | Fp8Op | PackedOp


def dequant_op(stream: SlabLayout, name: str, out: torch.Tensor, staging: torch.Tensor) -> DequantOp:
    """The op that writes tensor `name` of `staging` (a layer in the `stream` layout) into `out`."""
    src = stream.by_name()
    entry = src[name]
    if entry.role != "q":
        return CopyOp(out, entry.view(staging))
    if stream.format == FP8:
        return Fp8Op(out, entry.view(staging), src[name + ".__scale"].view(staging))
    return PackedOp(out, packed_weight(src, name, staging))


def dequant_ops(native: SlabLayout, stream: SlabLayout, dst: torch.Tensor, staging: torch.Tensor) -> list[DequantOp]:
    """The ops that turn `staging` (a layer in the `stream` layout) into `dst` (NATIVE layout)."""
    return [dequant_op(stream, entry.name, entry.view(dst), staging) for entry in native.entries]


def dequantise(ops: list[DequantOp], *, fused_kernel: bool = True) -> None:
    """Enqueue `ops` on the current stream; `fused_kernel=False` forces the torch kernels (to
    compare the two). Nothing is allocated except by the packed format's torch reference."""
    device = ops[0].dst.device if ops else None
    for op in ops:
        if isinstance(op, CopyOp):
            op.dst.copy_(op.src)
        elif isinstance(op, Fp8Op):
            fused = _fp8_kernel(device) if fused_kernel else None
            if fused is not None:
                fused(op.q, op.scale, op.dst)
            else:
                op.dst.copy_(op.q)
                op.dst.mul_(op.scale[:, None])
        else:
            fused = _packed_kernel(device) if fused_kernel else None
            if fused is not None:
                fused(op.packed, op.dst)
            else:
                op.dst.copy_(unpack_bf16(op.packed))


def require_packed_kernel(device: torch.device) -> None:
    """Raise unless bf16-packed layers can be decoded on `device` without allocating."""
    if device.type == "cuda" and _packed_kernel(device) is None:
        raise RuntimeError(
            f"{PACKED} streaming needs Triton on CUDA and it is unavailable on {device} (see the log); "
            "use stream dtype bf16 (the same bits, 4/3 of the bytes)"
        )


def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        log.info("triton is not installed: fp8 layers are dequantised with torch kernels (slower), bf16-packed is unavailable")
        return None
    return triton, tl


def _self_checked(device: torch.device, what: str, check) -> bool:
    """Run `check()` on `device`; a GPU or Triton build that gets a bit wrong must not be used."""
    try:
        with torch.cuda.device(device):
            if not check():
                raise RuntimeError("result differs from torch's")
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
        log.warning("fused %s decoding unavailable on %s (%s)", what, device, exc)
        return False
    return True


@functools.cache
def _fp8_kernel(device: torch.device):
    """The Triton fp8 kernel as `fn(q, scale, out)` if it compiles and matches torch on `device`, else None."""
    if device.type != "cuda" or (imported := _triton()) is None:
        return None
    triton, tl = imported

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

    def check() -> bool:
        weight = torch.randn(64, 5000, device=device)
        scale = weight.abs().amax(dim=1) / 448
        q = (weight / scale[:, None]).to(torch.float8_e4m3fn)
        expected = q.to(torch.bfloat16).mul_(scale[:, None])
        got = torch.empty_like(expected)
        fused(q, scale, got)
        return torch.equal(got, expected)

    return fused if _self_checked(device, "fp8", check) else None


@functools.cache
def _packed_kernel(device: torch.device):
    """The Triton bf16-packed decoder as `fn(packed, out)` if it compiles and matches the
    reference on `device`, else None."""
    if device.type != "cuda" or (imported := _triton()) is None:
        return None
    triton, tl = imported

    @triton.jit
    def expand(low_ptr, codes_ptr, base_ptr, out_ptr, numel, PAIRS: tl.constexpr):
        # One load of each code byte, split into its two elements' codes in element order.
        # Loading it once per element (at offset // 2, a gather the compiler does not
        # vectorise) made a Large layer's decoding 14% slower on an H100: 0.549 against 0.480 ms.
        pairs = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
        byte = tl.load(codes_ptr + pairs, mask=pairs < (numel + 1) // 2).to(tl.int32)
        code = tl.interleave(byte & 15, byte >> 4)
        offsets = tl.program_id(0) * 2 * PAIRS + tl.arange(0, 2 * PAIRS)
        mask = offsets < numel
        low = tl.load(low_ptr + offsets, mask=mask).to(tl.int32)
        offset = code & 7
        high = ((code & 8) << 4) | tl.where(offset == 7, 0, offset + tl.load(base_ptr).to(tl.int32))  # 7: top exponent 0
        tl.store(out_ptr + offsets, ((high << 8) | low).to(tl.int16), mask=mask)  # truncation keeps the bits

    @triton.jit
    def patch(positions_ptr, bytes_ptr, out_bytes_ptr, count, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = j < count
        position = tl.load(positions_ptr + j, mask=mask).to(tl.int64)
        tl.store(out_bytes_ptr + 2 * position + 1, tl.load(bytes_ptr + j, mask=mask), mask=mask)

    def fused(packed: PackedBf16, out: torch.Tensor) -> None:
        numel, count = packed.low.numel(), packed.exception_positions.numel()
        bits = out.view(torch.int16)
        expand[(triton.cdiv(numel, 2 * _PACKED_PAIRS),)](packed.low, packed.codes, packed.base, bits, numel, PAIRS=_PACKED_PAIRS, num_warps=8)
        patch[(triton.cdiv(count, _BLOCK),)](packed.exception_positions, packed.exception_bytes, bits.view(torch.uint8), count, BLOCK=_BLOCK)

    def check() -> bool:
        weight = torch.randn(64, 5001, device=device).mul_(0.02).to(torch.bfloat16)
        weight[3, :7] = torch.tensor([0.0, -0.0, 1e-30, -3e30, float("inf"), float("nan"), 1.0])
        packed = pack_bf16(weight)
        got = torch.empty_like(weight)
        fused(packed, got)
        return torch.equal(got.view(torch.int16), weight.view(torch.int16))

    return fused if _self_checked(device, "bf16-packed", check) else None

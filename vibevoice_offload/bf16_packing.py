"""Lossless 12-bit storage of bf16 weights: the same bits across the link in 3/4 of the bytes.

A bf16 number is a sign, 8 exponent bits and 7 mantissa bits. Its low byte (the lowest
exponent bit and the mantissa) is close to random and is kept as it is. Its high byte (the
sign and the top 7 exponent bits) takes few values within one weight matrix: the weights
span a handful of binades around their scale, so 7 consecutive top-exponent values (14
binades) of either sign hold nearly every element. That byte becomes a 4-bit code: bit 3
the sign, bits 0-2 the top exponent minus a per-tensor `base`, or 7 for a top exponent of 0
(zeros, subnormals: pruned or zero-initialised weights cost nothing). Elements outside
(values 2^14 times smaller than the largest, outliers) are exceptions, listed as (position,
high byte) and written after the codes are expanded.

The exception list has a fixed capacity, `exception_capacity(numel)` (1 in 256 elements;
Gaussian weights need about 1 in 3,300), so every decoder layer packs into the same slab
layout and GPU buffer. Unused entries repeat element 0 with its true high byte: writing
them is harmless. A tensor with more exceptions than that is refused with a clear error.

The idea of coding the exponent is DFloat11's (Zhang et al., 2025, Huffman codes, about 11
bits); fixed 4-bit codes give up a bit for a decoder that is one elementwise pass
(`offload/dequant.py` runs it as a Triton kernel; `unpack_bf16` here is the reference).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from .errors import VibeVoiceError

EXCEPTIONS_PER_ELEMENT = 1 / 256
"""Capacity of the exception list, per element of the tensor."""
WINDOW = 7
"""Top-exponent values a code can name (per sign); the eighth 3-bit value, ZERO, names top exponent 0."""
ZERO = 7
_SIGN = 0x80


class PackingError(VibeVoiceError):
    """A weight that the 12-bit format cannot hold (too many values outside its window)."""


class PackedBf16(NamedTuple):
    """One bf16 tensor in 12 bits per element, plus its exceptions."""

    low: torch.Tensor
    """uint8, the tensor's shape: each element's low byte."""
    codes: torch.Tensor
    """uint8 (ceil(numel / 2),): element 2i's code in the low nibble, 2i+1's in the high one."""
    base: torch.Tensor
    """uint8 (1,): the top-exponent value that code 0 (and 8, negative) stands for (>= 1)."""
    exception_positions: torch.Tensor
    """int32 (capacity,): flat indices whose high byte the codes do not give."""
    exception_bytes: torch.Tensor
    """uint8 (capacity,): those elements' high bytes."""


def exception_capacity(numel: int) -> int:
    return max(1, -(-numel // round(1 / EXCEPTIONS_PER_ELEMENT)))


def packed_nbytes(numel: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each part after `low` (whose shape is the tensor's), by suffix."""
    capacity = exception_capacity(numel)
    return {
        "codes": (((numel + 1) // 2,), torch.uint8),
        "base": ((1,), torch.uint8),
        "exception_positions": ((capacity,), torch.int32),
        "exception_bytes": ((capacity,), torch.uint8),
    }


def _byte_planes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low bytes, high bytes) of a contiguous bf16 tensor, as flat uint8 views."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host runs CUDA
        raise PackingError("12-bit bf16 packing assumes a little-endian host")
    planes = weight.contiguous().view(torch.uint8).view(-1, 2)
    return planes[:, 0], planes[:, 1]


def pack_bf16(weight: torch.Tensor, name: str = "weight") -> PackedBf16:
    """Pack a bf16 tensor (any device); raises `PackingError` naming `name` if it has more
    exceptions than the format holds."""
    if weight.dtype != torch.bfloat16:
        raise PackingError(f"{name}: 12-bit packing takes bf16 tensors, got {weight.dtype}")
    # Inference mode: a dtype view of an inference tensor (a model loaded or unpacked under
    # inference mode) raises outside it in torch 2.11; packing is never differentiated.
    with torch.inference_mode():
        return _pack(weight, name)


def _pack(weight: torch.Tensor, name: str) -> PackedBf16:
    numel = weight.numel()
    low, high = _byte_planes(weight.detach())
    histogram = torch.bincount(high, minlength=256)
    per_top_exponent = histogram[:128] + histogram[128:]  # both signs
    base = 1 + int(per_top_exponent[1:].unfold(0, WINDOW, 1).sum(1).argmax())
    top_exponent = (high & 0x7F).to(torch.int16)
    offset = torch.where(top_exponent == 0, ZERO, top_exponent - base)
    outside = (offset < 0) | (offset > ZERO)
    positions = outside.nonzero().flatten()
    capacity = exception_capacity(numel)
    if len(positions) > capacity:
        raise PackingError(
            f"{name}: {len(positions)} of {numel} values ({len(positions) / numel:.2%}) lie outside the 14 binades "
            f"12-bit packing codes (it holds {EXCEPTIONS_PER_ELEMENT:.2%}); stream this model as bf16"
        )
    code = ((high & _SIGN) >> 4) | offset.clamp_(0, ZERO).to(torch.uint8)
    if numel % 2:
        code = torch.cat([code, code.new_zeros(1)])
    codes = code[0::2] | (code[1::2] << 4)
    exception_positions = torch.zeros(capacity, dtype=torch.int32, device=weight.device)
    exception_positions[: len(positions)] = positions.to(torch.int32)
    exception_bytes = high[exception_positions.long()]  # padding: element 0 and its true byte
    base_tensor = torch.tensor([base], dtype=torch.uint8, device=weight.device)
    return PackedBf16(low.contiguous().view(weight.shape), codes, base_tensor, exception_positions, exception_bytes)


def unpack_bf16(packed: PackedBf16) -> torch.Tensor:
    """The bf16 tensor `packed` holds, bit for bit (the reference decoder; allocates)."""
    low = packed.low.reshape(-1)
    code = torch.stack([packed.codes & 0x0F, packed.codes >> 4], dim=1).flatten()[: low.numel()]
    offset = code & 0x07
    high = ((code & 0x08) << 4) | torch.where(offset == ZERO, 0, offset + packed.base).to(torch.uint8)
    planes = torch.stack([low, high], dim=1)
    planes[:, 1][packed.exception_positions.long()] = packed.exception_bytes
    return planes.view(torch.bfloat16).view(packed.low.shape)

"""The lossless 12-bit bf16 format: every bit comes back, and what it cannot hold is refused."""

from __future__ import annotations

import pytest
import torch

from vibevoice_offload.bf16_packing import (
    EXCEPTIONS_PER_ELEMENT, PackingError, exception_capacity, pack_bf16, packed_nbytes, unpack_bf16,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 300.0])
@pytest.mark.parametrize("shape", [(64, 96), (33, 7), (1, 1), (5,)])
def test_round_trip_is_bit_exact(scale, shape):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * scale).to(torch.bfloat16)
    packed = pack_bf16(weight)
    assert packed.low.shape == weight.shape and packed.codes.numel() == (weight.numel() + 1) // 2
    assert torch.equal(_bits(unpack_bf16(packed)), _bits(weight))


def test_special_values_come_back():
    """Zeros and subnormals have a code of their own; infinities, NaN and values far from the
    tensor's scale are exceptions."""
    weight = (torch.randn(256, 256, generator=torch.Generator().manual_seed(4)) * 0.02).to(torch.bfloat16)
    coded = torch.tensor([0.0, -0.0, 1e-40, -1e-39], dtype=torch.bfloat16)
    listed = torch.tensor([float("inf"), float("-inf"), float("nan"), -3e38, 1e-20], dtype=torch.bfloat16)
    weight.view(-1)[1000:1004] = coded
    weight.view(-1)[2000:2005] = listed
    packed = pack_bf16(weight)
    exceptions = set(packed.exception_positions.tolist())
    assert set(range(2000, 2005)) <= exceptions and not set(range(1000, 1004)) & exceptions
    assert torch.equal(_bits(unpack_bf16(packed)), _bits(weight))


def test_zeros_cost_nothing():
    weight = (torch.randn(64, 64, generator=torch.Generator().manual_seed(6)) * 0.02).to(torch.bfloat16)
    weight[:, ::2] = 0.0  # half the weights pruned
    packed = pack_bf16(weight)
    assert packed.exception_positions.eq(0).all()
    assert torch.equal(_bits(unpack_bf16(packed)), _bits(weight))


def test_unused_exception_entries_repeat_element_zero():
    weight = (torch.randn(128, 128, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    weight.view(-1)[7] = 1e30
    packed = pack_bf16(weight)
    positions = packed.exception_positions.tolist()
    used = [p for p in positions if p != 0]
    assert 7 in used and len(used) < 16  # the outlier, and the odd Gaussian value 2^14 below the largest
    high_byte_of_0 = weight.view(-1)[:1].view(torch.uint8)[1]
    assert all(b == high_byte_of_0 for p, b in zip(positions, packed.exception_bytes.tolist()) if p == 0)


def test_the_window_follows_the_tensor_scale():
    small = pack_bf16(torch.full((16,), 1e-3, dtype=torch.bfloat16))
    large = pack_bf16(torch.full((16,), 1e3, dtype=torch.bfloat16))
    assert int(large.base) > int(small.base)
    # one value, both signs: all in the window, nothing to list
    mixed = torch.tensor([0.5, -0.5] * 300, dtype=torch.bfloat16)
    packed = pack_bf16(mixed)
    assert packed.exception_positions.eq(0).all() and torch.equal(_bits(unpack_bf16(packed)), _bits(mixed))


def test_too_many_exceptions_are_refused_by_name():
    weight = torch.full((64, 64), 0.02, dtype=torch.bfloat16)
    weight.view(-1)[: 2 * exception_capacity(weight.numel())] = 1e30
    with pytest.raises(PackingError, match=r"layers\.3\.mlp\.up_proj\.weight: 32 of 4096 .*stream this model as bf16"):
        pack_bf16(weight, "layers.3.mlp.up_proj.weight")


def test_only_bf16_is_packed():
    with pytest.raises(PackingError, match="takes bf16 tensors, got torch.float32"):
        pack_bf16(torch.randn(4, 4))


def test_sizes_are_three_quarters_plus_the_exception_list():
    numel = 3584 * 18944  # a Large MLP weight
    parts = packed_nbytes(numel)
    capacity = exception_capacity(numel)
    assert capacity == numel * EXCEPTIONS_PER_ELEMENT
    total = numel + sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in parts.values())
    assert total == numel + numel // 2 + 1 + 5 * capacity
    assert total / (2 * numel) == pytest.approx(0.75 + 5 / 512, abs=1e-6)

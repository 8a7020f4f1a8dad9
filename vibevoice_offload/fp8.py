"""fp8 (e4m3fn) weight storage with one scale per output channel, upcast when used.

Used for loading (`dtype="fp8"`: decoder-layer linear weights stored in fp8) and by the
offloader (streaming half the bytes over the host link, dequantised on the GPU).
"""

from __future__ import annotations

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (per output channel) symmetric fp8 quantisation: returns (fp8 weight, float32 scale[out])."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / _FP8_MAX
    return (w / scale[:, None]).to(FP8_DTYPE), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp8 weight * scale -> `dtype`; writes into `out` (a GPU slot) when given, allocating nothing."""
    if out is None:
        return (q.to(torch.float32) * scale[:, None]).to(dtype)
    torch.mul(q.to(dtype), scale[:, None].to(dtype), out=out)
    return out


class Fp8Linear(nn.Module):
    """A drop-in `nn.Linear` whose weight is stored in fp8 and upcast to the activation dtype per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_fp8(self.weight_fp8, self.weight_scale, x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def fp8_linear_names(layer: nn.Module) -> list[str]:
    """Names of the nn.Linear submodules of a decoder layer (q/k/v/o projections and the MLP)."""
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]

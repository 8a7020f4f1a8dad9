"""A KV cache that allocates once per generation and then only writes in place.

transformers' `DynamicCache` grows each layer with `torch.cat` on every step: a new,
larger K and V tensor per layer per frame, which the caching allocator eventually serves
with fresh `cudaMalloc` segments as the sequence grows. `PreallocatedCache` keeps each
layer's K and V in one [batch, kv_heads, max_length, head_dim] buffer allocated at the
first update (the prompt pass) and exposes `keys`/`values` as views of the filled prefix,
so every `DynamicLayer` method that reads them (`get_seq_length`, `get_mask_sizes`,
`crop`) works unchanged, in transformers 5.17 through 5.24.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are prefixes of preallocated buffers."""

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max(int(max_length), 1)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._allocate(key_states, value_states, self.max_length)
        self.keys = self._k[:, :, :0]
        self.values = self._v[:, :, :0]

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> None:
        b, h, _, d = key_states.shape
        self._k = torch.empty(b, h, length, d, dtype=key_states.dtype, device=key_states.device)
        self._v = torch.empty(b, value_states.shape[1], length, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self._k is None:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._k.shape[-2] or key_states.shape[0] != self._k.shape[0]:
            # Longer than planned (or a different batch): grow once, correct but it allocates.
            log.warning("KV cache grows past its preallocated %d positions (to %d): reallocating", self._k.shape[-2], end)
            old_k, old_v = self.keys, self.values
            self._allocate(key_states, value_states, max(end, 2 * self._k.shape[-2]))
            self._k[:, :, :start].copy_(old_k)
            self._v[:, :, :start].copy_(old_v)
        self._k[:, :, start:end].copy_(key_states)
        self._v[:, :, start:end].copy_(value_states)
        self.keys = self._k[:, :, :end]
        self.values = self._v[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None


class PreallocatedCache(DynamicCache):
    """`DynamicCache` API (crop, get_seq_length, masks) over `PreallocatedLayer`s."""

    def __init__(self, config, max_length: int) -> None:
        super().__init__(config=config)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.layers = [PreallocatedLayer(max_length) for _ in range(text.num_hidden_layers)]
        self.max_length = max_length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer._k, layer._v) if t is not None)

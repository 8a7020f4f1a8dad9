"""The decoder half of a frame: the CFG branches through the LLM's decoder layers.

The branches run as the rows of one batch. A decode step is one token per branch, and
each layer's weights are then read once for both (they are the bulk of the GPU's work),
the kernels are launched once for both, and a streamed layer crosses the link once.

Their KV caches are rows of one static buffer per layer (`BranchCache`): each row's length
and visible range are device tensors, so a step has the same shapes and addresses every
frame, and on CUDA each layer's step is captured as a CUDA graph and replayed.
A resident Large frame launched ~1,400 kernels in this half from Python: the host, not
the GPU, bounded it. The graphs live for one run and are keyed by layer and by the module
that runs it: a streamed layer runs from whichever slot (or staged compute buffer) the
offloader filled, each with its own weight addresses, so it is captured once per slot it
lands in. A layer with forward hooks (a patch, an adapter) runs eagerly: a replay would
skip them. The offloader orders copies around `decoder_layer` /
`decoder_layer_done` on the compute stream, outside the graphs, so replay sees the weights
just as eager calls do.

Attention reads each row's cache up to a "view" rounded up to VIEW_BUCKET positions, with
a mask for the positions a row has not written or hides; when the longest row outgrows the
view, the layer graphs are captured again for the next view.

The prompt passes (one per branch, different lengths) run eagerly, one row at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PretrainedConfig

from .cuda_graphs import GraphPool
from .executor import Executor

# Attention views grow in steps of this many positions (34 s of audio): each step captures
# the layers again (~1 ms each), and a view wastes at most this many masked positions.
VIEW_BUCKET = 256

# cuDNN's SDPA kernel (picked first by torch 2.11 on Hopper) builds a new cuDNN graph for
# every new KV length: about 2.4 ms of host time per attention call in eager decode
# (measured, H200). Flash/efficient kernels give the same results without the per-shape
# set-up; a masked step runs the efficient kernel.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks that a graph replay would skip."""
    from torch.nn.modules import module as torch_module

    global_hooks = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)
    return any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def round_up(positions: int) -> int:
    """`positions` rounded up to a whole number of VIEW_BUCKETs."""
    return -(-max(positions, 1) // VIEW_BUCKET) * VIEW_BUCKET


class BranchCache:
    """The CFG branches' KV caches: row b of each layer's [rows, kv_heads, capacity, head_dim]
    K and V buffers is branch b. Allocated once per run, written in place.

    Host-side `lengths` / `visible_from` are the truth; their device copies (set by kernels
    with the value as an argument, never a host-to-device copy, so never a synchronisation)
    are what captured steps read.

    The decoder layers call `update` (transformers' cache interface) and attend over what it
    returns: in a row pass (`row` set), row `row`'s filled prefix; in a step, every row's
    view, after writing each row's new K/V at that row's length.
    """

    def __init__(self, text_config: PretrainedConfig, rows: int, max_length: int, device: torch.device, dtype: torch.dtype) -> None:
        heads = text_config.num_key_value_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.capacity = round_up(max_length)
        shape = (rows, heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(text_config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(text_config.num_hidden_layers)]
        self.lengths = [0] * rows
        self.visible_from = [0] * rows
        self.device_lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.device_visible_from = torch.zeros(rows, dtype=torch.long, device=device)
        # Where a step writes each row's new K/V: its length, broadcast over heads and dims.
        self._write_at = self.device_lengths.view(rows, 1, 1, 1).expand(rows, heads, 1, head_dim)
        # Which `update` the layers get: a row pass of row `row` (prompts, one branch at a
        # time), or, with None, a step of every row over the first `view` positions.
        self.row: int | None = None
        self.view = VIEW_BUCKET

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.row is not None:
            row, start = self.row, self.lengths[self.row]
            end = start + key_states.shape[-2]
            keys[row : row + 1, :, start:end].copy_(key_states)
            values[row : row + 1, :, start:end].copy_(value_states)
            return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
        keys.scatter_(2, self._write_at, key_states)
        values.scatter_(2, self._write_at, value_states)
        return keys[:, :, : self.view], values[:, :, : self.view]

    def advance(self, rows: range | list[int], tokens: int) -> None:
        for row in rows:
            self._set_length(row, self.lengths[row] + tokens)

    def undo_last(self, row: int) -> None:
        """Forget row `row`'s last position (the negative branch only advances on frames)."""
        if self.lengths[row] == 0:
            raise RuntimeError(f"KV cache row {row} is empty: nothing to undo")
        self._set_length(row, self.lengths[row] - 1)

    def hide_before_now(self, row: int) -> None:
        """Row `row` attends only to positions written from now on (a speech segment starts)."""
        self.visible_from[row] = self.lengths[row]
        self.device_visible_from[row].fill_(self.lengths[row])

    def _set_length(self, row: int, length: int) -> None:
        if length > self.capacity:
            raise RuntimeError(f"KV cache row {row} is full ({self.capacity} positions): the frame cap was not respected")
        self.lengths[row] = length
        self.device_lengths[row].fill_(length)


class DecoderPass:
    """Runs the branches through every decoder layer, fetching each layer from `executor`.

    `run_rows` runs the prompt passes; `step(embeds)` feeds the same token to every branch.
    Both return final-normed last hidden states, [branches, hidden].
    """

    def __init__(self, lm: nn.Module, executor: Executor, cache: BranchCache, graphs: GraphPool | None) -> None:
        self.lm = lm
        self.executor = executor
        self.cache = cache
        self.graphs = graphs
        self.num_layers = len(lm.layers)
        rows, device = cache.rows, executor.device
        dtype = lm.norm.weight.dtype
        # The step's inputs, at fixed addresses (what the graphs read).
        self.hidden = torch.zeros(rows, 1, lm.config.hidden_size, device=device, dtype=dtype)
        self.positions = cache.device_lengths.view(rows, 1)
        cos, sin = lm.rotary_emb(self.hidden, self.positions)
        self.rotary = (torch.empty_like(cos), torch.empty_like(sin))
        self.mask = torch.zeros(rows, 1, 1, cache.capacity, dtype=torch.bool, device=device)
        self._mask_view = self.mask[..., : cache.view]  # what attention reads: the current view
        self._cache_positions = torch.arange(cache.capacity, device=device)
        self._steps = 0
        self._layer_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    @property
    def captured_layers(self) -> int:
        return len(self._layer_graphs)

    def run_rows(self, inputs: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Eagerly, each (row, embeds [1, n, hidden]) through layer i before layer i+1, the
        rows one after another: the prompt passes (rows of different lengths), or one token
        at a time. Returns each row's final-normed last hidden state, [len(inputs), hidden]."""
        cache = self.cache
        prepared = []
        for row, embeds in inputs:
            start, n = cache.lengths[row], embeds.shape[1]
            positions = torch.arange(start, start + n, device=embeds.device).unsqueeze(0)
            prepared.append([row, embeds, positions, self.lm.rotary_emb(embeds, positions), self._row_mask(row, n)])
        try:
            with sdpa_kernel(_SDPA_BACKENDS):
                for index in range(self.num_layers):
                    layer = self.executor.decoder_layer(index)
                    for item in prepared:
                        row, hidden, positions, rotary, mask = item
                        cache.row = row
                        item[1] = layer(hidden, mask, positions, cache, True, rotary)
                    self.executor.decoder_layer_done(index)
        finally:
            cache.row = None
        for row, embeds in inputs:
            cache.advance([row], embeds.shape[1])
        return self.lm.norm(torch.cat([item[1][:, -1, :] for item in prepared]))

    def _row_mask(self, row: int, tokens: int) -> torch.Tensor | None:
        """None where SDPA's own masking is right: an empty row (causal flag) or one token
        that sees the whole row."""
        start, visible_from = self.cache.lengths[row], self.cache.visible_from[row]
        if start == 0 or (tokens == 1 and visible_from == 0):
            return None
        if tokens != 1:
            raise ValueError("a row pass continues a row one token at a time")
        return (torch.arange(start + 1, device=self.hidden.device) >= visible_from).view(1, 1, 1, -1)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """One token, embeds [1, 1, hidden], for every branch at once."""
        cache = self.cache
        if max(cache.lengths) + 1 > cache.capacity:
            raise RuntimeError(f"the KV cache is full ({cache.capacity} positions): the frame cap was not respected")
        view = round_up(max(cache.lengths) + 1)
        if view != cache.view:
            cache.view = view
            self._mask_view = self.mask[..., :view]
            self._drop_graphs()  # captured for the old view
        self._prepare()
        self.hidden.copy_(embeds.expand_as(self.hidden))
        # The first step runs eagerly: it loads every kernel the captures will record.
        capture = self.graphs is not None and self._steps > 0
        with sdpa_kernel(_SDPA_BACKENDS):
            for index in range(self.num_layers):
                layer = self.executor.decoder_layer(index)
                graph = self._layer_graphs.get((index, id(layer)))
                if graph is None and capture and not _has_hooks(layer):
                    graph = self._capture(index, layer)
                if graph is not None:
                    graph.replay()
                else:
                    self._layer_step(layer)
                self.executor.decoder_layer_done(index)
        self._steps += 1
        cache.advance(range(cache.rows), 1)
        return self.lm.norm(self.hidden[:, -1, :])

    def _prepare(self) -> None:
        """The step's positions (each row's length), rotary tables and attention mask."""
        cache = self.cache
        for buffer, value in zip(self.rotary, self.lm.rotary_emb(self.hidden, self.positions)):
            buffer.copy_(value)
        positions = self._cache_positions[None, :]
        visible = (positions >= cache.device_visible_from[:, None]) & (positions <= cache.device_lengths[:, None])
        self.mask.copy_(visible[:, None, None, :])

    def _layer_step(self, layer: nn.Module) -> None:
        self.hidden.copy_(layer(self.hidden, self._mask_view, self.positions, self.cache, True, self.rotary))

    def _capture(self, index: int, layer: nn.Module) -> torch.cuda.CUDAGraph | None:
        captured = self.graphs.capture(lambda: self._layer_step(layer))
        if captured is None:
            self._drop_graphs()
            self.graphs = None  # an op that cannot be captured: the rest of the run is eager
            return None
        self._layer_graphs[(index, id(layer))] = captured[0]
        return captured[0]

    def _drop_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.drop(self._layer_graphs.values())
        self._layer_graphs.clear()

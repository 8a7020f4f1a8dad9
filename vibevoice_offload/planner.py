"""VRAM planner: how many decoder layers fit on the GPU, and how fast the rest stream.

Pure arithmetic over the model's real shapes (read from a meta-device instance, so no
weights and no GPU are needed), plus an NVML query for free VRAM and a cached pinned
host-to-device bandwidth measurement. The planner takes the VRAM budget as a parameter
everywhere: inside ComfyUI the nodes pass the budget ComfyUI grants; elsewhere
`budget_from_free(free_vram_bytes())` gives one.

Units: sizes are bytes; "GB" in messages and tables is 10**9 bytes (as in VIBEVOICE.md and
PERFORMANCE.md), link bandwidth is GB/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, VibeVoiceConfig, VibeVoiceForConditionalGeneration

from .config import SAMPLE_RATE, build_config, detect_layout, hop_length, load_config
from .decoder_pass import round_up as kv_positions
from .errors import VibeVoiceError
from .bf16_packing import packed_nbytes
from .fp8 import FP8_DTYPE
from .offload.host_slabs import ALIGN as SLAB_ALIGN, allocate_slab
from .plan import STREAM_DTYPES, OffloadPlan, StreamDtype, residency_order
from .offload.gpu_slots import ring_nbytes

GB = 10**9
MiB = 2**20

FP8_SCALE_DTYPE = torch.float32  # one scale per output row of each streamed nn.Linear (fp8.quantize_fp8)
LM_HEAD_ROWS = 4  # speech start / end / frame and end: the only ids the decoder may emit


class PlanError(VibeVoiceError):
    """No plan fits the VRAM budget, or the requested plan is impossible for this model."""


# --------------------------------------------------------------------------------------
# Byte-exact sizes from the model's real shapes
# --------------------------------------------------------------------------------------

# Submodule paths inside `VibeVoiceForConditionalGeneration`.
COMPONENT_PATHS = {
    "embed_tokens": "model.language_model.embed_tokens",
    "norm": "model.language_model.norm",
    "lm_head": "lm_head",
    "diffusion_head": "model.diffusion_head",
    "acoustic_encoder": "model.audio_tower.encoder",
    "acoustic_decoder": "model.audio_tower.decoder",
    "semantic_encoder": "model.semantic_tokenizer_encoder",
    "acoustic_connector": "model.multi_modal_projector",
    "semantic_connector": "model.semantic_connector",
}
LAYERS_PATH = "model.language_model.layers"


@dataclass(frozen=True)
class _TensorCensus:
    """One tensor of a decoder layer, as the engine's slab layout sees it."""

    numel: int
    rows: int
    """out_features when this is an nn.Linear weight (fp8-quantisable, one float32 scale per
    row); 0 otherwise."""
    itemsize: int
    """Bytes per element of a buffer (its own dtype); 0 for a floating parameter, which takes
    the model dtype."""


@dataclass(frozen=True)
class _LayerCensus:
    tensors: tuple[_TensorCensus, ...]  # parameters then buffers, as `SlabLayout.build` lists them


@dataclass(frozen=True)
class _Census:
    """Dtype-free element counts, taken once per config from a meta-device model."""

    param_numel: dict[str, int]  # component name (or "other") -> floating parameter elements
    buffer_bytes: dict[str, int]  # buffers keep their own dtype (float32 rotary / timestep tables)
    layers: tuple[_LayerCensus, ...]
    conv_cache_elements: dict[str, int]  # streaming conv cache elements per batch item


_CENSUS_CACHE: dict[str, _Census] = {}


def _component_of(name: str) -> str:
    if name.startswith(LAYERS_PATH + "."):
        return "layer." + name[len(LAYERS_PATH) + 1 :].split(".", 1)[0]
    for component, path in COMPONENT_PATHS.items():
        if name.startswith(path + "."):
            return component
    return "other"  # latent scaling/bias scalars and the rotary embedding's buffers


def _conv_cache_elements(module: nn.Module) -> int:
    """Elements per batch item of the streaming conv cache transformers allocates for
    `module`: each causal conv keeps `in_channels x left_pad` past samples (the same two
    attributes `VibeVoiceAcousticTokenizerConv1dCacheLayer` reads to allocate it)."""
    return sum(
        m.in_channels * m.left_pad
        for m in module.modules()
        if hasattr(m, "cache_key") and hasattr(m, "left_pad") and hasattr(m, "in_channels")
    )


def _take_census(config: VibeVoiceConfig) -> _Census:
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(copy.deepcopy(config))
    param_numel: dict[str, int] = {}
    buffer_bytes: dict[str, int] = {}
    # named_parameters() lists a tied weight once, under its first name (embed_tokens), so
    # a tied lm_head counts 0 bytes.
    for name, param in model.named_parameters():
        component = _component_of(name)
        param_numel[component] = param_numel.get(component, 0) + param.numel()
    for name, buffer in model.named_buffers():
        component = _component_of(name)
        buffer_bytes[component] = buffer_bytes.get(component, 0) + buffer.numel() * buffer.element_size()
    layers = []
    for layer in model.model.language_model.layers:
        linear_rows = {f"{name}.weight" if name else "weight": m.out_features for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        tensors = [
            _TensorCensus(p.numel(), linear_rows.get(name, 0) if p.dim() == 2 else 0, 0 if p.is_floating_point() else p.element_size())
            for name, p in layer.named_parameters()
        ]
        tensors += [_TensorCensus(b.numel(), 0, b.element_size()) for _, b in layer.named_buffers()]
        layers.append(_LayerCensus(tuple(tensors)))
    conv_cache = {
        "acoustic_decoder": _conv_cache_elements(model.model.audio_tower.decoder),
        "semantic_encoder": _conv_cache_elements(model.model.semantic_tokenizer_encoder),
    }
    return _Census(param_numel, buffer_bytes, tuple(layers), conv_cache)


_CENSUS_BY_ID: dict[int, tuple[weakref.ref, _Census]] = {}


def _census(config: VibeVoiceConfig) -> _Census:
    """Cached per config content; the same config object skips even the JSON key (auto
    mode runs hundreds of estimates, and `to_json_string` costs ~8 ms each)."""
    hit = _CENSUS_BY_ID.get(id(config))
    if hit is not None and hit[0]() is config:
        return hit[1]
    key = config.to_json_string()
    if key not in _CENSUS_CACHE:
        _CENSUS_CACHE[key] = _take_census(config)
    census = _CENSUS_CACHE[key]
    try:
        _CENSUS_BY_ID[id(config)] = (weakref.ref(config, lambda _, i=id(config): _CENSUS_BY_ID.pop(i, None)), census)
    except TypeError:  # not weak-referenceable: key by content only
        pass
    return census


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each part of the model in one model dtype. Floating parameters count
    `numel x dtype.itemsize`; buffers count in their own dtype (float32 tables)."""

    layers: tuple[int, ...]
    """Each decoder layer in the model dtype, as the engine lays it out in a slab, a GPU slot
    or a resident buffer: every tensor starts on a `SLAB_ALIGN` (256-byte) boundary, so
    each tensor's bytes are rounded up to a multiple of 256. The released configs' tensors
    are all multiples of 256 bytes already (no padding); tiny test models are not."""
    layers_fp8: tuple[int, ...]
    """Each decoder layer as streamed in fp8 (the engine's FP8 slab): nn.Linear weights at 1
    byte per element and one float32 scale per output row, each padded to 256 bytes, plus
    biases and norms in the model dtype, padded likewise."""
    layers_packed: tuple[int, ...]
    """Each decoder layer as streamed bf16-packed (the engine's PACKED slab): nn.Linear
    weights in `bf16_packing`'s parts (1.5 bytes per element plus the exception list), each
    padded to 256 bytes, plus biases and norms as they are."""
    largest_weights: tuple[int, ...]
    """Each decoder layer's largest nn.Linear weight in the model dtype: what a staged layer
    decoded on use needs in model-dtype VRAM (`gpu_slots.weight_buffer_nbytes`)."""
    embed_tokens: int
    lm_head: int
    """0 when tied to `embed_tokens` (1.5B)."""
    lm_head_slice: int
    """The 4 rows of lm_head the frame loop uses: 4 x hidden x dtype (Qwen2's lm_head has no bias)."""
    norm: int
    diffusion_head: int
    acoustic_encoder: int
    acoustic_decoder: int
    semantic_encoder: int
    acoustic_connector: int
    semantic_connector: int
    other: int
    """Everything not named above: two scalars and the rotary embedding's buffers."""

    @property
    def total(self) -> int:
        """The whole model as loaded (tied weights once)."""
        return (
            sum(self.layers) + self.embed_tokens + self.lm_head + self.norm + self.diffusion_head
            + self.acoustic_encoder + self.acoustic_decoder + self.semantic_encoder
            + self.acoustic_connector + self.semantic_connector + self.other
        )

    def stream_bytes(self, index: int, stream_dtype: StreamDtype) -> int:
        """Bytes of decoder layer `index` as it sits in its host slab and crosses the link."""
        by_dtype = {"bf16": self.layers, "bf16-packed": self.layers_packed, "fp8": self.layers_fp8}
        return by_dtype[stream_dtype][index]

    def resident_bytes(self, index: int, plan: OffloadPlan) -> int:
        """Bytes of decoder layer `index` kept on the GPU under `plan`: packed for encoded
        residents, else in the model dtype."""
        return self.stream_bytes(index, plan.stream_dtype) if plan.encoded_residents else self.layers[index]


def _align(nbytes: int) -> int:
    return -(-nbytes // SLAB_ALIGN) * SLAB_ALIGN


def _slab_bytes(layer: _LayerCensus, itemsize: int, stream_dtype: StreamDtype) -> int:
    """Bytes of one decoder layer in the engine's slab layout (`host_slabs.SlabLayout`): each
    tensor at a 256-byte-aligned offset. fp8: a Linear weight becomes 1-byte elements plus a
    separately aligned float32 scale per row; bf16-packed: its low bytes and each further
    part of `bf16_packing`, separately aligned."""
    total = 0
    for t in layer.tensors:
        if stream_dtype == "fp8" and t.rows:
            total += _align(t.numel * FP8_DTYPE.itemsize) + _align(t.rows * FP8_SCALE_DTYPE.itemsize)
        elif stream_dtype == "bf16-packed" and t.rows:
            parts = packed_nbytes(t.numel).values()
            total += _align(t.numel) + sum(_align(math.prod(shape) * dtype.itemsize) for shape, dtype in parts)
        else:
            total += _align(t.numel * (t.itemsize or itemsize))
    return total


def model_sizes(config: VibeVoiceConfig, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
    """Byte sizes of every part of the model; the meta-device census is cached per config."""
    return _sizes(config, _census(config), dtype)


def _sizes(config: VibeVoiceConfig, census: _Census, dtype: torch.dtype) -> ModelSizes:
    itemsize = dtype.itemsize

    def part(name: str) -> int:
        return census.param_numel.get(name, 0) * itemsize + census.buffer_bytes.get(name, 0)

    return ModelSizes(
        layers=tuple(_slab_bytes(c, itemsize, "bf16") for c in census.layers),
        layers_fp8=tuple(_slab_bytes(c, itemsize, "fp8") for c in census.layers),
        layers_packed=tuple(_slab_bytes(c, itemsize, "bf16-packed") for c in census.layers),
        largest_weights=tuple(max((t.numel * itemsize for t in c.tensors if t.rows), default=0) for c in census.layers),
        embed_tokens=part("embed_tokens"),
        lm_head=part("lm_head"),
        lm_head_slice=LM_HEAD_ROWS * config.text_config.hidden_size * itemsize,
        norm=part("norm"),
        diffusion_head=part("diffusion_head"),
        acoustic_encoder=part("acoustic_encoder"),
        acoustic_decoder=part("acoustic_decoder"),
        semantic_encoder=part("semantic_encoder"),
        acoustic_connector=part("acoustic_connector"),
        semantic_connector=part("semantic_connector"),
        other=part("other"),
    )


# --------------------------------------------------------------------------------------
# The workload a plan is sized for
# --------------------------------------------------------------------------------------

# Prompt tokens besides the script text and the voice frames (prompt.py's layout). Measured
# with Qwen2.5's tokenizer: the system line, " Voice input:\n", " Text input:\n",
# " Speech output:\n" and the final speech start are 30 tokens; rounded up for safety.
PROMPT_FIXED_TOKENS = 48
# Per speaker: " Speaker {i}:" (4 tokens), speech start, speech end, "\n": 7; rounded up.
PROMPT_TOKENS_PER_SPEAKER = 8

FRAMES_PER_MINUTE = 450  # 7.5 frames per second (3200-sample frames at 24 kHz)
# About 150 spoken words a minute at ~1.25 tokens a word, plus the " Speaker k:" line
# prefixes, rounded up: an assumption for sizing the prompt when the script is not known
# yet (the nodes pass the real count).
TEXT_TOKENS_PER_MINUTE = 250


@dataclass(frozen=True)
class Workload:
    """What one generation asks of the KV cache and the activations."""

    voice_samples: tuple[int, ...]
    """Samples of each speaker's reference clip (24 kHz)."""
    max_frames: int
    """Speech frames the KV caches must hold (7.5 per second of audio)."""
    text_tokens: int
    """Tokens of the script lines (" Speaker k: text\\n" each)."""

    @classmethod
    def for_minutes(cls, minutes: float, *, speakers: int = 2, clip_seconds: float = 30.0) -> Workload:
        return cls(
            voice_samples=(round(clip_seconds * SAMPLE_RATE),) * speakers,
            max_frames=math.ceil(minutes * FRAMES_PER_MINUTE),
            text_tokens=math.ceil(minutes * TEXT_TOKENS_PER_MINUTE),
        )


    @classmethod
    def for_prompt(cls, config: VibeVoiceConfig, length: int, voice_samples: Sequence[int], max_frames: int) -> Workload:
        """The workload of a real prompt of `length` tokens: its text tokens are what the
        fixed text and the voice blocks leave."""
        voices = tuple(int(v) for v in voice_samples)
        return cls(voices, max_frames, max(1, length - prompt_length(config, voices, 0)))


DEFAULT_MINUTES = 10.0
DEFAULT_WORKLOAD = Workload.for_minutes(DEFAULT_MINUTES)
"""Two speakers with 30 s clips, 10 minutes of audio (4,500 frames, 2,500 text tokens)."""


def _clips(voice_samples: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(voice_samples, int):
        return (voice_samples,) if voice_samples > 0 else ()
    return tuple(voice_samples)


def prompt_length(config: VibeVoiceConfig, voice_samples: int | Sequence[int], text_tokens: int) -> int:
    """Positions of the positive branch's prompt: script tokens + ceil(samples / 3200) voice
    frames per speaker + `PROMPT_FIXED_TOKENS` + `PROMPT_TOKENS_PER_SPEAKER` per speaker."""
    clips = _clips(voice_samples)
    hop = hop_length(config)
    voice_frames = sum(math.ceil(samples / hop) for samples in clips)
    return text_tokens + voice_frames + PROMPT_FIXED_TOKENS + PROMPT_TOKENS_PER_SPEAKER * len(clips)


# --------------------------------------------------------------------------------------
# Activation models (documented envelopes, not measurements)
# --------------------------------------------------------------------------------------


def _head_dim(config: VibeVoiceConfig) -> int:
    # Qwen2Config has no head_dim attribute in transformers 5.24; Qwen2 derives it.
    tc = config.text_config
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def _decoder_pass_bytes(config: VibeVoiceConfig, q_len: int, kv_len: int, batch: int, itemsize: int) -> int:
    """Peak activation bytes inside one Qwen2 decoder layer for `batch` sequences of
    `q_len` new tokens attending to `kv_len` positions. Elements (model dtype):

    - stream: 4 x q x hidden (inputs_embeds, residual, normed input, block output);
    - attention: q x (hidden + 2 kv_dim) projections + 2 x q x (hidden + kv_dim) rotary
      temporaries + 2 x heads x kv x head_dim repeat_kv copies of K and V (only for q > 1:
      transformers packs GQA at q == 1) + 2 x heads x q x kv scores and softmax (SDPA's math
      kernel, the fallback on GPUs without fused kernels: the envelope) + q x hidden output;
    - MLP: 3 x q x intermediate (activation, up projection, their product);
    - the larger of attention and MLP (they do not overlap).
    Plus bytes: a q x kv bool mask and float32 rotary cos/sin (2 x q x head_dim x 4).
    KV tensors are not counted here: they are the KV cache term.
    """
    tc = config.text_config
    hidden, inter, heads, head_dim = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, _head_dim(config)
    kv_dim = tc.num_key_value_heads * head_dim
    stream = 4 * q_len * hidden
    repeated = 0 if q_len == 1 else 2 * heads * kv_len * head_dim
    attention = (
        q_len * (hidden + 2 * kv_dim) + 2 * q_len * (hidden + kv_dim) + repeated + 2 * heads * q_len * kv_len + q_len * hidden
    )
    mlp = 3 * q_len * inter
    elements = batch * (stream + max(attention, mlp))
    return elements * itemsize + batch * q_len * kv_len + batch * 2 * q_len * head_dim * 4


def _conv_extents(tokenizer_config: PretrainedConfig, samples: int) -> list[tuple[int, int]]:
    """(channels, length) at each resolution of the acoustic/semantic conv stack for a
    clip of `samples`: the stem at `num_filters` x samples, then stage i at
    num_filters x 2**(i+1) channels and samples / prod(ratios[:i+1]) steps. The decoder
    visits the same (channels, length) pairs in reverse order."""
    extents = [(tokenizer_config.num_filters, samples)]
    stride = 1
    for i, ratio in enumerate(tokenizer_config.downsampling_ratios):
        stride *= ratio
        extents.append((tokenizer_config.num_filters * 2 ** (i + 1), math.ceil(samples / stride)))
    return extents


def _conv_stack_peak_bytes(tokenizer_config: PretrainedConfig, samples: int, itemsize: int) -> int:
    """Peak activation bytes of a ConvNeXt conv stack on one clip: at the widest
    channels x length, 3 model-dtype tensors (residual, block input, causally padded copy)
    + 2 x ffn_expansion (first FFN linear's output and its GELU) + 8 bytes of float32
    RMSNorm temporaries (the norm upcasts and squares)."""
    widest = max(channels * length for channels, length in _conv_extents(tokenizer_config, samples))
    return widest * ((3 + 2 * tokenizer_config.ffn_expansion) * itemsize + 8)


def _diffusion_bytes(config: VibeVoiceConfig, itemsize: int) -> int:
    """One diffusion-head step at batch 2 (positive and negative conditions stacked):
    8 x hidden (noisy projection, condition, timestep embedding, 3 adaLN chunks, norm and
    modulated input) + 3 x intermediate (gate, up, product), model dtype. The scheduler's
    few [2, 64] float32 tensors are below the slack's resolution."""
    head = config.diffusion_head_config
    return 2 * (8 * head.hidden_size + 3 * head.intermediate_size) * itemsize


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------

# Reserved minus allocated, measured (NVIDIA H200, Large, 7 plans from 4.6 to 17.8 GB
# allocated, bench/results/NVIDIA-H200-20261127.json): 176-213 MB, growing about 3 MB per GB.
# 2% + 128 MiB covers that with room for longer prompts' transients (the measured runs had
# a 341-token prompt) and stays within the 5% of the measured peak.
ALLOCATOR_SLACK_FRACTION = Fraction(2, 100)
ALLOCATOR_SLACK_FIXED = 128 * MiB


@dataclass(frozen=True)
class Estimate:
    """Peak VRAM and host RAM of one generation under one plan, in bytes.

    Counts what PyTorch's caching allocator hands out; the CUDA context is not counted
    (ComfyUI's budget already excludes it; `budget_from_free` leaves headroom for it).
    `resident_weights + slots` is exactly `OffloadEngine.resident_bytes` after `load()`
    (tests/test_planner_engine.py), and `host_slabs` exactly `OffloadEngine.host_bytes` of
    a freshly built engine.
    """

    resident_weights: int
    """On the GPU for the whole run, what the engine places there (model dtype; buffers in
    their own dtype): the resident decoder layers (each `ModelSizes.layers`, i.e. the
    engine's 256-byte-aligned layout; encoded residents `ModelSizes.layers_packed`), final norm, rotary tables, embed_tokens (unless
    `embed_on_host`), diffusion head, acoustic decoder, semantic encoder, both connectors
    and the two latent scalars. The full lm_head never goes to the GPU."""
    slots: int
    """The engine's streaming ring (`gpu_slots.SlotRing`), 0 when nothing is streamed. With
    S = `OffloadPlan.ring_slots` (the engine never builds more slots than
    layers to stream): bf16 streaming, S model-dtype slots of one layer each; staged
    streaming (fp8, bf16-packed), S staging slots (the layer's encoded slab: weights and
    their other parts, biases and norms) plus what the weights are decoded into
    (`OffloadPlan.compute_buffers`): 2, two model-dtype layers (decoded a layer ahead, on a
    stream of their own); 1, the largest weight (decoded on use). Encoded residents need
    that even when nothing is streamed."""
    kv_cache: int
    """Both CFG branches, ALL decoder layers (streamed layers keep their KV on the GPU): the
    branches are rows of one static buffer per layer (`decoder_pass.BranchCache`), each
    prompt_len + max_frames positions rounded up to the attention view (256): 2 x positions
    x layers x 2 (K and V) x kv_heads x head_dim x dtype bytes. The negative row reserves
    the prompt's positions too, unused; at cfg 1 the loop allocates one row, so this
    over-estimates by one row there."""
    prefill_activations: int
    """The prompt pass of the positive branch (`_decoder_pass_bytes` with q = kv = prompt_len,
    batch 1) + logits of the 4-row slice for every prompt position (prompt_len x 4 x 4 bytes,
    float32)."""
    acoustic_encoder_peak: int
    """Encoding the voice clips before the prompt pass (the encoder is on the GPU only
    then). The clips run as one batch zero-padded to the longest, so with S speakers and L
    samples in the longest clip rounded up to a multiple of the hop (3200): encoder
    weights + S x L x (4 + dtype bytes) (the clips as float32 and in the model dtype)
    + S x the conv stack's peak for L samples (`_conv_stack_peak_bytes`)."""
    diffusion_and_tokenizer_workspace: int
    """Per-frame transients, summed: one decode step (`_decoder_pass_bytes` with q = 1,
    kv = the cache's positions, batch 2: the branches run as one batch over the whole
    view; plus 2 x 4 float32 logits); one diffusion-head step (`_diffusion_bytes`); the
    conv stack's peak on one frame (hop samples); and the streaming conv caches of the
    acoustic decoder and semantic encoder (batch 1). The KV cache is allocated at its final
    length, so growing it copies nothing."""
    frame_extension: int
    """What the engine adds on the GPU for the frames only (`OffloadPlan.frame_layers` more
    resident layers and `frame_slots` more ring slots: `plan.in_frames()`'s weights and
    ring less the plan's), from `begin_frames` after the prompt pass to the run's end. The
    planner sizes it to fit the VRAM the voice encoding and the prompt pass needed
    (`with_frame_extension`); it is part of the frame phase only."""
    lm_head_rows: int
    """The 4 rows of lm_head the frame loop copies to the GPU for each run (4 x hidden x
    dtype bytes): the frame loop's, not the engine's, so not in `resident_weights`."""
    allocator_slack: int
    """Reserved minus allocated: 2% of the larger phase + 128 MiB (see ALLOCATOR_SLACK_*)."""
    total_vram: int
    """max(prefill phase, frame phase) + allocator_slack: the peak the caching allocator
    reserves."""
    host_slabs: int
    """The engine's host slabs, exactly: resident layers in the model dtype (kept for a fast
    reload; encoded residents packed), streamed layers in the stream dtype; pinned or pageable per the plan. (An
    engine whose residency was changed after packing keeps staged slabs of layers that
    became resident: `set_resident_layers` never re-packs them.)"""
    host_ram: int
    """Host memory the model holds under the engine: `host_slabs` plus every other part of
    the model at its loaded size (the engine keeps the host copy of each module it places
    on the GPU, so unloading costs no copy): embed_tokens, the full lm_head (0 when tied),
    norm, diffusion head, acoustic encoder and decoder, semantic encoder, connectors,
    scalars and rotary tables. Python, torch and CUDA libraries are not counted."""

    @property
    def prefill_phase(self) -> int:
        """Voice encoding, then the prompt pass: the encoder is released before the first
        decoder layer runs, so the two take the max, not the sum."""
        return self.resident_weights + self.slots + self.lm_head_rows + self.kv_cache + max(self.prefill_activations, self.acoustic_encoder_peak)

    @property
    def frame_phase(self) -> int:
        return (
            self.resident_weights + self.slots + self.frame_extension + self.lm_head_rows + self.kv_cache
            + self.diffusion_and_tokenizer_workspace
        )

    @property
    def weights(self) -> int:
        """What the engine holds on the device: `OffloadEngine.resident_bytes` after `load()`."""
        return self.resident_weights + self.slots


def ring_bytes(sizes: ModelSizes, plan: OffloadPlan, num_layers: int) -> int:
    """The engine's slot ring for `plan` (`gpu_slots.ring_nbytes` of its largest decoded
    layer); `plan.ring_slots` slots."""
    streamed = plan.streamed_indices(num_layers)
    decoded = plan.decoded_indices(num_layers) if plan.staged else streamed
    if not decoded:
        return 0
    native = max(sizes.layers[i] for i in decoded)
    staged = max(sizes.stream_bytes(i, plan.stream_dtype) for i in decoded) if plan.staged else None
    weight = max(sizes.largest_weights[i] for i in decoded)
    return ring_nbytes(native, staged, plan.ring_slots(num_layers), plan.compute_buffers, plan.encoded_residents, weight)


def _frame_extension_bytes(sizes: ModelSizes, plan: OffloadPlan, num_layers: int) -> int:
    """`Estimate.frame_extension`: the frame-only resident layers plus the ring's growth."""
    frames = plan.in_frames()
    return (
        sum(sizes.resident_bytes(i, plan) for i in frames.resident_indices(num_layers)[plan.resident_layers :])
        + ring_bytes(sizes, frames, num_layers) - ring_bytes(sizes, plan, num_layers)
    )


def kv_cache_bytes(config: VibeVoiceConfig, positions: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV cache of one branch holding `positions` positions in every decoder layer."""
    tc = config.text_config
    return positions * tc.num_hidden_layers * 2 * tc.num_key_value_heads * _head_dim(config) * dtype.itemsize


def estimate(
    config: VibeVoiceConfig,
    plan: OffloadPlan,
    *,
    dtype: torch.dtype = torch.bfloat16,
    voice_samples: int | Sequence[int],
    max_frames: int,
    text_tokens: int,
) -> Estimate:
    """Peak VRAM and host RAM for generating `max_frames` frames with `plan`.

    `voice_samples` is each speaker's clip length in samples (an int means one clip).
    """
    num_layers = config.text_config.num_hidden_layers
    plan.validate(num_layers)
    census = _census(config)
    sizes = _sizes(config, census, dtype)
    itemsize = dtype.itemsize
    hop = hop_length(config)
    residents, streamed = plan.resident_indices(num_layers), plan.streamed_indices(num_layers)

    always = (
        sizes.norm + sizes.diffusion_head + sizes.acoustic_decoder + sizes.semantic_encoder
        + sizes.acoustic_connector + sizes.semantic_connector + sizes.other
    )
    resident = sum(sizes.resident_bytes(i, plan) for i in residents) + always + (0 if plan.embed_on_host else sizes.embed_tokens)
    slots = ring_bytes(sizes, plan, num_layers)

    prompt_len = prompt_length(config, voice_samples, text_tokens)
    positions = kv_positions(prompt_len + max_frames)
    kv = 2 * kv_cache_bytes(config, positions, dtype)

    prefill = _decoder_pass_bytes(config, prompt_len, prompt_len, 1, itemsize) + prompt_len * LM_HEAD_ROWS * 4

    clips = _clips(voice_samples)
    encoder_peak = 0
    if clips:
        longest = math.ceil(max(clips) / hop) * hop
        encoder_peak = sizes.acoustic_encoder + len(clips) * (
            longest * (4 + itemsize) + _conv_stack_peak_bytes(config.audio_config, longest, itemsize)
        )

    workspace = (
        _decoder_pass_bytes(config, 1, positions, 2, itemsize) + 2 * LM_HEAD_ROWS * 4
        + _diffusion_bytes(config, itemsize)
        + max(
            _conv_stack_peak_bytes(config.audio_config, hop, itemsize),
            _conv_stack_peak_bytes(config.semantic_model_config, hop, itemsize),
        )
        + (census.conv_cache_elements["acoustic_decoder"] + census.conv_cache_elements["semantic_encoder"]) * itemsize
    )

    extension = _frame_extension_bytes(sizes, plan, num_layers)

    base = resident + slots + sizes.lm_head_slice + kv
    peak = base + max(prefill, encoder_peak, workspace + extension)
    slack = math.ceil(peak * ALLOCATOR_SLACK_FRACTION) + ALLOCATOR_SLACK_FIXED

    host_slabs = sum(sizes.resident_bytes(i, plan) for i in residents) + sum(sizes.stream_bytes(i, plan.stream_dtype) for i in streamed)
    host = host_slabs + always + sizes.embed_tokens + sizes.lm_head + sizes.acoustic_encoder
    return Estimate(
        resident_weights=resident,
        slots=slots,
        kv_cache=kv,
        prefill_activations=prefill,
        acoustic_encoder_peak=encoder_peak,
        diffusion_and_tokenizer_workspace=workspace,
        frame_extension=extension,
        lm_head_rows=sizes.lm_head_slice,
        allocator_slack=slack,
        total_vram=peak + slack,
        host_slabs=host_slabs,
        host_ram=host,
    )


# --------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------


def free_vram_bytes(device_index: int = 0) -> int:
    """Free memory of GPU `device_index` as the driver sees it (other processes included).

    NVML first (no CUDA context is created); else `torch.cuda.mem_get_info`. NVML numbers
    GPUs in PCI order, which differs from CUDA's when CUDA_VISIBLE_DEVICES reorders them.
    """
    failures = []
    try:
        import pynvml
    except ImportError as exc:
        failures.append(f"NVML: pynvml is not installed ({exc}); pip install nvidia-ml-py")
    else:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            failures.append(f"NVML: nvmlInit failed ({exc})")
        else:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
                return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
            except pynvml.NVMLError as exc:
                failures.append(f"NVML: cannot read GPU {device_index} ({exc})")
            finally:
                pynvml.nvmlShutdown()
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda is not available")
        free, _total = torch.cuda.mem_get_info(device_index)
        return int(free)
    except (RuntimeError, AssertionError) as exc:
        failures.append(f"torch: {exc}")
    raise PlanError(
        f"cannot read the free VRAM of GPU {device_index}: " + "; ".join(failures)
        + ". Pass the VRAM budget explicitly (e.g. --vram 12GB)."
    )


def budget_from_free(free: int, target_utilisation: float = 0.9) -> int:
    """A budget leaving `1 - target_utilisation` of the free VRAM to the CUDA context,
    cuBLAS workspaces and other programs' growth."""
    if not 0 < target_utilisation <= 1:
        raise ValueError(f"target_utilisation must be in (0, 1], got {target_utilisation}")
    return int(free * target_utilisation)


_VRAM_UNITS = {"": GB, "G": GB, "GB": GB, "GIB": 2**30, "M": 10**6, "MB": 10**6, "MIB": MiB}


def parse_vram(text: str) -> int:
    """"12GB", "12G", "12", "8.5GB" -> bytes (GB = 10**9; "GiB"/"MiB"/"MB" also accepted)."""
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("GIMB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in _VRAM_UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"cannot read VRAM amount {text!r}: expected e.g. 12GB, 12G, 12 or 8.5GB")
    return int(value * _VRAM_UNITS[unit])


def _gb(nbytes: int) -> str:
    """GB with 2 decimals; 3 below 1 GB (tiny test models), so 'needs X but the budget is Y'
    never prints the same number twice for different amounts."""
    return f"{nbytes / GB:.2f}" if nbytes >= GB else f"{nbytes / GB:.3f}"


# --------------------------------------------------------------------------------------
# Modes: auto, presets, manual
# --------------------------------------------------------------------------------------

PRESETS: dict[str, Fraction] = {
    "light": Fraction(3, 4),
    "moderate": Fraction(1, 2),
    "balanced": Fraction(7, 20),
    "aggressive": Fraction(3, 20),
    "extreme": Fraction(0),
}
"""Share of the decoder layers kept resident: resident = floor(share x num_layers), the same
meaning for 1.5B and Large (28 layers: 21 / 14 / 9 / 4 / 0). "light" offloads least,
"extreme" streams every layer. Exact fractions, so floor() never suffers float rounding."""


def model_label(config: VibeVoiceConfig) -> str:
    tc = config.text_config
    name = _SIZE_BY_SHAPE.get((tc.hidden_size, tc.num_hidden_layers))
    return f"VibeVoice-{name}" if name else f"VibeVoice ({tc.hidden_size} wide, {tc.num_hidden_layers} layers)"


def estimate_for_workload(config: VibeVoiceConfig, plan: OffloadPlan, dtype: torch.dtype, workload: Workload) -> Estimate:
    """`estimate` for a `Workload` (its voice clips, frames and text tokens)."""
    return estimate(
        config, plan, dtype=dtype, voice_samples=workload.voice_samples,
        max_frames=workload.max_frames, text_tokens=workload.text_tokens,
    )


def _auto_buffer_counts(stream_dtype: str, compute_buffers: int | None = None) -> tuple[int, ...]:
    """The `compute_buffers` auto tries, in its order: only `compute_buffers` if given; for a
    staged format two (decoded a layer ahead), then one (decoded on use). The last needs the
    least VRAM."""
    if compute_buffers:
        return (compute_buffers,)
    return (2, 1) if stream_dtype != "bf16" else (2,)


def _auto_minimum(
    stream_dtype: StreamDtype, prefetch_depth: int, pinned: bool, embed_on_host: bool, compute_buffers: int | None = None
) -> OffloadPlan:
    """The plan of least VRAM auto can choose with this ring depth: every decoder layer
    streamed, decoded as the last of `_auto_buffer_counts`. Auto fits a budget exactly when
    this plan does."""
    buffers = _auto_buffer_counts(stream_dtype, compute_buffers)[-1]
    return OffloadPlan(0, stream_dtype, prefetch_depth, pinned, embed_on_host, compute_buffers=buffers)


def _ring_words(plan: OffloadPlan) -> str:
    decoding = {1: ", decoded on use", 2: ", decoded a layer ahead"}[plan.compute_buffers] if plan.staged else ""
    return f"{plan.stream_dtype}, prefetch depth {plan.prefetch_depth}{decoding}"


def _refusal(
    config: VibeVoiceConfig, plan: OffloadPlan, need: int, budget_bytes: int, dtype: torch.dtype, workload: Workload, what: str
) -> PlanError:
    """The error for `plan` not fitting: the least VRAM of `plan`'s ring (every layer
    streamed) and, where auto's cheaper decoding (on use) needs less, that too. It points to
    the cheapest mode that fits, and only when none does to ways of needing less VRAM."""
    n = config.text_config.num_hidden_layers

    def minimum_of(ring: OffloadPlan) -> int:
        return estimate_for_workload(config, ring, dtype, workload).total_vram

    same_ring = dataclasses.replace(plan, resident_layers=0, frame_layers=0, frame_slots=0)
    minimum = minimum_of(same_ring)
    message = (
        f"{model_label(config)}: {what} needs {_gb(need)} GB of VRAM but the budget is {_gb(budget_bytes)} GB. "
        f"The minimum for this model and audio length is {_gb(minimum)} GB (all {n} decoder layers streamed, {_ring_words(plan)})"
    )
    auto = _auto_minimum(plan.stream_dtype, plan.prefetch_depth, plan.pinned, plan.embed_on_host)
    auto_minimum = minimum_of(auto)
    if auto_minimum < minimum:
        message += f"; {_gb(auto_minimum)} GB as mode 'auto' plans it ({_ring_words(auto)})"
    message += ". "
    if minimum <= budget_bytes:
        message += "Use mode 'auto' or a preset that keeps fewer layers resident ('aggressive', 'extreme')."
    elif auto_minimum <= budget_bytes:
        message += "Mode 'auto', decoding on use, fits this budget."
    else:
        hints = ["free VRAM (unload other models, close other programs)", "plan for shorter audio (the KV cache grows with length)"]
        if not plan.embed_on_host:
            hints.append(f"keep embed_tokens on the host (saves {_gb(model_sizes(config, dtype).embed_tokens)} GB)")
        if plan.prefetch_depth > 2:
            hints.append("use prefetch depth 2")
        if size_name(config) == "Large":
            hints.append("use the 1.5B model")
        message += "To run: " + ", or ".join(hints) + "."
    return PlanError(message)


AUTO_DEPTH_GAIN = 0.01
"""auto chooses a deeper ring only when it is predicted more than 1% faster: near-ties keep
the shallower ring and so more resident layers."""


def _most_resident(
    config: VibeVoiceConfig, budget_bytes: int, base: OffloadPlan, dtype: torch.dtype, workload: Workload
) -> tuple[OffloadPlan, int]:
    """The plan like `base` with the most resident layers whose estimate fits, and its need.
    Searches from all-resident downwards: the estimate is not monotone at the top (with
    a staged format, N-1 resident layers need a staging slot and what it is decoded into,
    possibly more than the layer itself; keeping all N drops the ring). Returns the 0-resident plan if nothing fits."""
    n = config.text_config.num_hidden_layers
    for resident in range(n, -1, -1):
        plan = dataclasses.replace(base, resident_layers=resident)
        need = estimate_for_workload(config, plan, dtype, workload).total_vram
        if need <= budget_bytes:
            break
    return plan, need


def plan_auto(
    config: VibeVoiceConfig,
    budget_bytes: int,
    *,
    stream_dtype: StreamDtype = "bf16",
    prefetch_depth: int | None = None,
    pinned: bool = True,
    embed_on_host: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    workload: Workload = DEFAULT_WORKLOAD,
    link_gbps: float | None = None,
    resident_ms: float | None = None,
    decoder_ms: float | None = None,
    frame_extension: bool = True,
    compute_buffers: int | None = None,
    encoded_residents: bool | None = None,
) -> OffloadPlan:
    """The fastest plan whose estimate fits `budget_bytes`.

    Auto chooses the ring: for each ring shape, the most resident layers that fit with
    that ring (its slots' VRAM is in the estimate, so a bigger ring costs resident layers),
    and of those plans the one `predict_ms_per_frame` rates fastest with its frame
    extension; a shape later in the order must win by AUTO_DEPTH_GAIN. The shapes, in
    that order: depth 2..N (or only `prefetch_depth` if given) with two compute buffers,
    then for a staged format the same depths decoded on use (`compute_buffers` 1: two
    layers less a weight of VRAM, so at the smallest budgets the only ring that fits); only
    `compute_buffers` if given; then for bf16-packed all of these again with encoded
    residents (`OffloadPlan.encoded_residents`: a third more resident layers in the same
    VRAM, each decoded before it runs; only one kind if `encoded_residents` is given). A ring of S
    slots can only get S layers ahead while the diffusion head and tokenizers run
    (measured on the H200: depth 2 left the copies 66-187 ms per frame behind), so at
    small budgets a deep ring beats a few more resident layers. `link_gbps` defaults to
    `link_bandwidth_gbps()`, `resident_ms` and `decoder_ms` to the model size's
    `ResidentFrame`.

    Unless `frame_extension` is False, each candidate gets its frame extension
    (`with_frame_extension`): the VRAM only the prompt phase needs holds more resident
    layers and slots during the frames.
    """
    n = config.text_config.num_hidden_layers
    depths = range(2, max(n, 2) + 1) if prefetch_depth is None else (prefetch_depth,)
    buffer_counts = _auto_buffer_counts(stream_dtype, compute_buffers)
    if encoded_residents is not None:
        residencies = (encoded_residents,)
    else:
        residencies = (False, True) if stream_dtype == "bf16-packed" else (False,)
    shapes = [(encoded, buffers) for encoded in residencies for buffers in buffer_counts]
    link = link_gbps
    best: OffloadPlan | None = None
    best_ms = math.inf
    for encoded, compute_buffers in shapes:
        for depth in depths:
            shape = OffloadPlan(0, stream_dtype, depth, pinned, embed_on_host, compute_buffers=compute_buffers, encoded_residents=encoded)
            candidate, need = _most_resident(config, budget_bytes, shape, dtype, workload)
            if need > budget_bytes:
                break  # a deeper ring only needs more
            if candidate.resident_layers == n and not encoded:
                return candidate  # no ring at all
            if depth > depths[0] and n - candidate.resident_layers < depth:
                continue  # fewer layers to stream than slots: the same ring as this shape's shallower depth
            link = link_bandwidth_gbps() if link is None else link
            if frame_extension:
                candidate = with_frame_extension(config, candidate, dtype, workload, link, resident_ms, decoder_ms)
            ms = predict_ms_per_frame(config, candidate, link, resident_ms, decoder_ms=decoder_ms, dtype=dtype)
            if best is None or ms < best_ms * (1 - AUTO_DEPTH_GAIN):
                best, best_ms = candidate, ms
    if best is None:
        smallest = _auto_minimum(stream_dtype, depths[0], pinned, embed_on_host, compute_buffers)
        need = estimate_for_workload(config, smallest, dtype, workload).total_vram
        raise _refusal(config, smallest, need, budget_bytes, dtype, workload, "streaming every decoder layer")
    return best


FRAME_EXTENSION_MARGIN = 96 * MiB
"""Of the VRAM the prompt phase needs beyond the frames', what the frame extension leaves
unused: once the extension fills the rest the frames are the peak phase, and their CUDA
graph pools and allocator rounding are not otherwise counted."""


def with_frame_extension(
    config: VibeVoiceConfig,
    plan: OffloadPlan,
    dtype: torch.dtype,
    workload: Workload,
    link_gbps: float,
    resident_ms: float | None = None,
    decoder_ms: float | None = None,
) -> OffloadPlan:
    """`plan` with the frame extension `predict_ms_per_frame` rates fastest.

    Voice encoding and the prompt pass need VRAM that the frames do not (for the released
    sizes about 0.9 GB, most of it the acoustic encoder), so the budget that fits the
    prompt leaves it idle while frames are generated. The extension spends it there: for
    each number of frame-only resident layers, the deepest ring that still fits, keeping
    the frame phase FRAME_EXTENSION_MARGIN below the prompt phase (the run's peak, and so
    the plan's VRAM, does not change). A bigger extension must be predicted more than
    AUTO_DEPTH_GAIN faster than a smaller one."""
    n = config.text_config.num_hidden_layers
    base = dataclasses.replace(plan, frame_layers=0, frame_slots=0)
    if base.resident_layers == n:
        return base
    est = estimate_for_workload(config, base, dtype, workload)
    room = est.prefill_phase - est.frame_phase - FRAME_EXTENSION_MARGIN
    sizes = model_sizes(config, dtype)

    def predict(candidate: OffloadPlan) -> float:
        return predict_ms_per_frame(config, candidate, link_gbps, resident_ms, decoder_ms=decoder_ms, dtype=dtype)

    best, best_ms = base, predict(base)
    for layers in range(n - base.resident_layers + 1):
        fits = None
        streamed = n - base.resident_layers - layers
        for slots in range(max(streamed - base.prefetch_depth, 0) + 1):
            candidate = dataclasses.replace(base, frame_layers=layers, frame_slots=slots)
            if _frame_extension_bytes(sizes, candidate, n) > room:
                break
            fits = candidate
        if fits is None:
            break  # these layers alone no longer fit: nor do more
        if fits == base:
            continue
        ms = predict(fits)
        if ms < best_ms * (1 - AUTO_DEPTH_GAIN):
            best, best_ms = fits, ms
    return best


def _checked(
    config: VibeVoiceConfig, plan: OffloadPlan, budget_bytes: int | None, dtype: torch.dtype, workload: Workload, what: str
) -> OffloadPlan:
    n = config.text_config.num_hidden_layers
    if not 0 <= plan.resident_layers <= n:
        full = OffloadPlan(n, plan.stream_dtype, plan.prefetch_depth, plan.pinned, plan.embed_on_host)
        raise PlanError(
            f"{model_label(config)}: {what} asks for {plan.resident_layers} resident decoder layers but the model has "
            f"{n}; choose 0..{n} ({n} keeps every layer on the GPU and needs "
            f"{_gb(estimate_for_workload(config, full, dtype, workload).total_vram)} GB of VRAM)."
        )
    try:
        plan.validate(n)
    except ValueError as exc:
        raise PlanError(f"{model_label(config)}: {what}: {exc}") from exc
    if budget_bytes is not None:
        need = estimate_for_workload(config, plan, dtype, workload).total_vram
        if need > budget_bytes:
            raise _refusal(config, plan, need, budget_bytes, dtype, workload, what)
    return plan


def preset_resident_layers(name: str, num_layers: int) -> int:
    if name not in PRESETS:
        raise PlanError(f"unknown offload preset {name!r}; choose one of {', '.join(PRESETS)}")
    return math.floor(PRESETS[name] * num_layers)


def encoded_residents_for(stream_dtype: str) -> bool:
    """Whether an explicit plan (a preset, a manual count, ComfyUI's grant) keeps its resident
    layers in the stream format: bf16-packed does (the same bits in 0.76x the VRAM, and
    whenever a layer streams the frame waits on the link, not on the decoding). With every
    layer resident that would decode each one every pass for nothing (Large: about 13 ms a
    frame): `auto`, `plan_manual` and the ComfyUI node keep every layer decoded where they all
    fit so."""
    return stream_dtype == "bf16-packed"


def plan_preset(
    config: VibeVoiceConfig,
    name: str,
    budget_bytes: int | None = None,
    *,
    stream_dtype: StreamDtype = "bf16",
    prefetch_depth: int = 2,
    pinned: bool = True,
    embed_on_host: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    workload: Workload = DEFAULT_WORKLOAD,
) -> OffloadPlan:
    """The preset's share of layers resident (`encoded_residents_for` the stream dtype); with a
    budget, refuses a preset that does not fit."""
    resident = preset_resident_layers(name, config.text_config.num_hidden_layers)
    plan = OffloadPlan(resident, stream_dtype, prefetch_depth, pinned, embed_on_host, encoded_residents=encoded_residents_for(stream_dtype))
    return _checked(config, plan, budget_bytes, dtype, workload, f"preset {name!r} ({resident} resident layers)")


def plan_manual(
    config: VibeVoiceConfig,
    resident_layers: int,
    stream_dtype: StreamDtype = "bf16",
    prefetch_depth: int = 2,
    pinned: bool = True,
    *,
    budget_bytes: int | None = None,
    embed_on_host: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    workload: Workload = DEFAULT_WORKLOAD,
) -> OffloadPlan:
    """Exactly the plan asked for (`encoded_residents_for` the stream dtype); refused if
    impossible, or (with a budget) if it does not fit. Every layer resident with bf16-packed:
    decoded where they fit so (nothing streams, so packing them would only add a decoding
    per layer and pass), else packed."""
    what = f"{resident_layers} resident layers"
    encoded = encoded_residents_for(stream_dtype)
    if encoded and resident_layers == config.text_config.num_hidden_layers:
        decoded = OffloadPlan(resident_layers, stream_dtype, prefetch_depth, pinned, embed_on_host, encoded_residents=False)
        if budget_bytes is None or estimate_for_workload(config, decoded, dtype, workload).total_vram <= budget_bytes:
            return _checked(config, decoded, budget_bytes, dtype, workload, what)
    plan = OffloadPlan(resident_layers, stream_dtype, prefetch_depth, pinned, embed_on_host, encoded_residents=encoded)
    return _checked(config, plan, budget_bytes, dtype, workload, what)


# --------------------------------------------------------------------------------------
# Speed: T_frame >= max(m k W / B, T_resident)   (PERFORMANCE.md)
# --------------------------------------------------------------------------------------

LINK_CROSSINGS_PER_FRAME = 1  # m: our loop passes both CFG branches through a layer at once


@dataclass(frozen=True)
class ResidentFrame:
    """T_resident: the frame time with every decoder layer on the GPU, and the part of it the
    decoder pass takes on the GPU's timeline (the engine's `offload_decoder_pass_ms`): the
    ring overlaps copies with the rest of the frame (diffusion head, tokenizers, sampling),
    which a ring of S slots can only get S layers ahead of."""

    ms: float
    decoder_ms: float
    measured: bool
    source: str


RESIDENT_FRAME = {
    "Large": ResidentFrame(
        22.4, 9.4, True,
        "NVIDIA H100 80GB HBM3 (PCIe 5), this project's frame loop (both halves of the frame replayed from "
        "CUDA graphs), 10 steps, cfg 1.3, median of 150 frames, the faster of two runs (22.40 and 22.58 ms; "
        "other runs that day on other H100s: 21.9-22.8); bench/results/NVIDIA-H100-80GB-HBM3-20261127.json",
    ),
    "1.5B": ResidentFrame(
        14.5, 5.0, True,
        "NVIDIA H100 80GB HBM3 (PCIe 5), the same method as Large's, the faster of two runs "
        "(14.54 and 14.57 ms; other runs that day on other H100s: 13.5-14.2); bench/results/NVIDIA-H100-80GB-HBM3-20261127.json",
    ),
}
"""T_resident per released size. With the frame replayed from CUDA graphs the GPU, not the
host, sets it; runs on one H100 still differed by up to 17% (1.5B), which
`bench/planner_accuracy.py` and `offload_bench.py` measure per run."""
DEFAULT_RESIDENT_MS = {size: frame.ms for size, frame in RESIDENT_FRAME.items()}

# GPU time to decode a streamed staged layer (dequant.dequantise, the fused kernels), per GB
# of model-dtype layer, for a Large layer (0.466 GB) on an H100
# (bench/results/NVIDIA-H100-80GB-HBM3-20261127-dequant-Large.json): fp8 0.386 ms (0.33-0.39
# over the day's runs), bf16-packed 0.480 ms.
DECODE_MS_PER_GB = {"fp8": 0.82, "bf16-packed": 1.03}

# Pinned host->device GB/s by PCIe generation (x16), used when no GPU can be measured.
# 4 and 5 are measured figures from PERFORMANCE.md; 3 is half of 4.
PCIE_DEFAULTS = {3: 12.0, 4: 25.0, 5: 54.0}
DEFAULT_PCIE_GEN = 4

LINK_CACHE_FILE = Path.home() / ".cache" / "vibevoice_offload" / "link.json"
_LINK_PROBE_BYTES = 256 * MiB
_LINK_PROBE_REPEATS = 5


def frame_ms(config: VibeVoiceConfig) -> float:
    """Audio duration of one frame: 3200 / 24000 s = 133.33 ms; the real-time limit."""
    return 1000 * hop_length(config) / SAMPLE_RATE


def size_name(config: VibeVoiceConfig) -> str | None:
    """"1.5B" or "Large" for the released shapes, else None."""
    tc = config.text_config
    return _SIZE_BY_SHAPE.get((tc.hidden_size, tc.num_hidden_layers))


def resident_frame(config: VibeVoiceConfig) -> ResidentFrame:
    """RESIDENT_FRAME for the model size; other shapes get Large's figure, labelled a default."""
    frame = RESIDENT_FRAME.get(size_name(config) or "")
    if frame is not None:
        return frame
    large = RESIDENT_FRAME["Large"]
    return ResidentFrame(large.ms, large.decoder_ms, False, f"an unreleased shape: Large's figure ({large.source})")


def default_resident_ms(config: VibeVoiceConfig) -> float:
    return resident_frame(config).ms


def simulate_frame_ms(
    num_layers: int,
    resident: int,
    depth: int,
    layer_ms: float,
    other_ms: float,
    copy_ms: float,
    *,
    staged: bool = False,
    dequant_ms: float = 0.0,
    compute_buffers: int = 2,
    encoded_residents: bool = False,
    order: Sequence[int] | None = None,
    frames: int = 10,
    warmup: int = 4,
) -> float:
    """Steady-state ms per frame of the engine's slot ring, by a small event simulation.

    Per frame: decoder layers 0..num_layers-1 (the first `resident` of `order`, by default
    `residency_order(num_layers)`, resident, the others streamed), each `layer_ms` of compute, then `other_ms` (diffusion
    head, tokenizers, sampling).
    Copies of `copy_ms` run in order on one copy engine, in the cyclic order of the streamed
    layers across frames; copy j goes into slot j % S (S = min(depth, streamed)) once that
    slot is free: when the layer copied into it by copy j - S has finished; a staged format
    (`staged`) decoded a layer ahead (2 `compute_buffers`), when that layer's decoding has
    finished. Decoded ahead, decodings (`dequant_ms` each) are queued in order on their own
    stream into one of the two compute buffers: decoding j may start when copy j is done
    and layer j - 2 has left its buffer. A layer may start when the previous one ended and
    its copy (decoded ahead: its decoding) is done. Decoded on use (1 `compute_buffers`), a
    layer's decoding is part of it: `dequant_ms` more on the compute stream. With
    `encoded_residents` (staged) the resident layers are decoded too, in the same order,
    with nothing to copy.

    Decodings and layers share the GPU: of the two streams' next pieces of work, the one
    ready first runs, and the other waits for it. (On the H100 a decoding running beside
    the layers did not overlap them: the 1.5B decoder pass took 4.8 ms resident, 6.1 ms
    with 17 fp8 decodings of 0.077 ms and 7.4 ms with 28 bf16-packed ones of 0.092 ms,
    the sums to 2%.) So decoding is free only while the layers wait for the link, and a
    ring of S slots can only get S layers ahead while the diffusion head and tokenizers run
    (and resident layers next to them): shallow rings leave the link idle there.
    """
    residents = set((residency_order(num_layers) if order is None else order)[:resident])
    copy_index = {layer: j for j, layer in enumerate(i for i in range(num_layers) if i not in residents)}
    streamed = len(copy_index)
    decodes_residents = staged and encoded_residents
    decodes_ahead = staged and compute_buffers > 1
    if streamed <= 0 and not decodes_residents:
        return num_layers * layer_ms + other_ms
    depth = min(depth, streamed)

    # The compute stream's work in order: (ms, the decoding it needs or None, the copy it needs or None)
    # per layer, then the rest of the frame; and the decodings' copies, in their order.
    computes: list[tuple[float, int | None, int | None]] = []
    decode_copies: list[int | None] = []
    frame_ends: list[int] = []
    for frame in range(frames):
        for layer in range(num_layers):
            copy = frame * streamed + copy_index[layer] if layer in copy_index else None
            decoded = staged and (copy is not None or decodes_residents)
            if decoded and decodes_ahead:
                decode_copies.append(copy)
                computes.append((layer_ms, len(decode_copies) - 1, None))
            else:
                computes.append((layer_ms + (dequant_ms if decoded else 0.0), None, copy))
        computes.append((other_ms, None, None))
        frame_ends.append(len(computes) - 1)
    decoded_by = {d: i for i, (_, d, _) in enumerate(computes) if d is not None}

    slot_free_at: dict[int, float] = {}  # copy j -> when slot j % S may take copy j + S
    copy_done: list[float] = []

    def copied(j: int) -> float:
        while len(copy_done) <= j:  # the copy engine runs the copies in order
            c = len(copy_done)
            copy_done.append(max(copy_done[-1] if copy_done else 0.0, slot_free_at.get(c - depth, 0.0)) + copy_ms)
        return copy_done[j]

    ended: list[float] = []  # per compute item
    decoded: list[float] = []  # per decoding
    gpu = compute_free = decode_free = 0.0
    while len(ended) < len(computes):
        ms, needs_decode, needs_copy = computes[len(ended)]
        compute_ready = None
        if needs_decode is None:
            compute_ready = max(compute_free, copied(needs_copy) if needs_copy is not None else 0.0)
        elif needs_decode < len(decoded):
            compute_ready = max(compute_free, decoded[needs_decode])
        decode_ready = None
        d = len(decoded)
        if d < len(decode_copies):
            frees = decoded_by[d - compute_buffers] if d >= compute_buffers else None  # the layer leaving its buffer
            if frees is None or frees < len(ended):
                copy = decode_copies[d]
                decode_ready = max(decode_free, copied(copy) if copy is not None else 0.0, ended[frees] if frees is not None else 0.0)
        if compute_ready is not None and (decode_ready is None or compute_ready <= decode_ready):
            gpu = compute_free = max(compute_ready, gpu) + ms
            ended.append(gpu)
            if needs_copy is not None:
                slot_free_at[needs_copy] = gpu
        else:
            gpu = decode_free = max(decode_ready, gpu) + dequant_ms
            decoded.append(gpu)
            if decode_copies[d] is not None:
                slot_free_at[decode_copies[d]] = gpu
    return (ended[frame_ends[-1]] - ended[frame_ends[warmup - 1]]) / (frames - warmup)


def _copy_ms(nbytes: int, link_gbps: float) -> float:
    """Link time of `nbytes` per frame: LINK_CROSSINGS_PER_FRAME crossings at `link_gbps`, in ms."""
    return LINK_CROSSINGS_PER_FRAME * nbytes / (link_gbps * GB) * 1000


def bound_ms_per_frame(
    config: VibeVoiceConfig,
    plan: OffloadPlan,
    link_gbps: float,
    resident_ms: float | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """PERFORMANCE.md's lower bound max(m x streamed link bytes / B, T_resident), in ms, for
    the layers streamed during the frames (`plan.in_frames()`)."""
    if link_gbps <= 0:
        raise ValueError(f"link_gbps must be positive, got {link_gbps}")
    plan = plan.in_frames()
    sizes = model_sizes(config, dtype)
    n = config.text_config.num_hidden_layers
    link_bytes = sum(sizes.stream_bytes(i, plan.stream_dtype) for i in plan.streamed_indices(n))
    return max(_copy_ms(link_bytes, link_gbps), default_resident_ms(config) if resident_ms is None else resident_ms)


def predict_ms_per_frame(
    config: VibeVoiceConfig,
    plan: OffloadPlan,
    link_gbps: float,
    resident_ms: float | None = None,
    *,
    decoder_ms: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """Predicted ms per frame: `simulate_frame_ms` of the plan's ring, with T_resident
    (`resident_ms`, default per model size) split into the decoder pass (`decoder_ms`;
    default: the size's measured share of T_resident, `ResidentFrame`) and the rest, copies
    of each streamed layer's link bytes at `link_gbps`, and for a staged format the decoding
    (DECODE_MS_PER_GB of the model-dtype layer). Never below `bound_ms_per_frame`.
    The frames run under `plan.in_frames()`."""
    plan = plan.in_frames()
    bound = bound_ms_per_frame(config, plan, link_gbps, resident_ms, dtype=dtype)  # rejects a link_gbps <= 0
    frame = resident_frame(config)
    t_resident = frame.ms if resident_ms is None else resident_ms
    if decoder_ms is None:
        decoder_ms = frame.decoder_ms / frame.ms * t_resident
    n = config.text_config.num_hidden_layers
    sizes = model_sizes(config, dtype)
    layer_ms = decoder_ms / n
    streamed = plan.streamed_indices(n)
    decoded = plan.decoded_indices(n)
    if not decoded and not streamed:
        return t_resident
    link = max((sizes.stream_bytes(i, plan.stream_dtype) for i in streamed), default=0)
    dequant_ms = DECODE_MS_PER_GB[plan.stream_dtype] * max(sizes.layers[i] for i in decoded) / GB if decoded else 0.0
    other_ms = t_resident - decoder_ms
    simulated = simulate_frame_ms(
        n, plan.resident_layers, plan.prefetch_depth, layer_ms, other_ms, _copy_ms(link, link_gbps),
        staged=plan.staged, dequant_ms=dequant_ms, compute_buffers=plan.compute_buffers,
        encoded_residents=plan.encoded_residents, order=residency_order(n, plan.stream_dtype),
    )
    return max(simulated, bound)


def real_time_factor(config: VibeVoiceConfig, ms_per_frame: float) -> float:
    """Generation time / audio duration: below 1 is faster than real time."""
    return ms_per_frame / frame_ms(config)


def _cuda_device(device: torch.device | str | None) -> torch.device:
    """`device` with its index; None: the current CUDA device. The link is to a CUDA device."""
    resolved = torch.device("cuda") if device is None else torch.device(device)
    if resolved.type != "cuda":
        raise ValueError(f"the host link is measured to a CUDA device, got {resolved}")
    return resolved if resolved.index is not None else torch.device("cuda", torch.cuda.current_device())


def measure_link_gbps(
    nbytes: int = _LINK_PROBE_BYTES, repeats: int = _LINK_PROBE_REPEATS, device: torch.device | str | None = None
) -> float:
    """Pinned host->device GB/s to `device` (default: the current CUDA device): one warm-up
    copy of `nbytes` (first touch, driver setup), then the median of `repeats` timed copies.
    The planner's cached figure uses 256 MiB x 5; the benchmarks (`bench_case.measure_h2d_gbps`)
    1 GiB x 7. The host buffer is a registered slab, as the engine streams from: exactly
    `nbytes`, unpinned when freed (PyTorch's pinned allocator would keep it cached)."""
    device = _cuda_device(device)
    host, pinned = allocate_slab(nbytes, pinned=True)
    if not pinned:
        raise PlanError(
            f"cannot pin {nbytes / MiB:.0f} MiB of host memory to measure the link to {device}; "
            "pass the link speed explicitly (e.g. --link-gbps 25)"
        )
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    with torch.cuda.device(device):  # the events and the copies' stream belong to `device`
        target.copy_(host, non_blocking=True)  # warm-up: first-touch and driver setup
        torch.cuda.synchronize(device)
        seconds = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
    return nbytes / statistics.median(seconds) / GB


def _read_link_cache(cache_file: Path) -> dict:
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def cached_link_gbps(cache_file: Path = LINK_CACHE_FILE) -> float | None:
    """The current CUDA device's cached link figure, never measuring; None if there is none."""
    if not torch.cuda.is_available():
        return None
    value = _read_link_cache(cache_file).get(torch.cuda.get_device_name())
    return float(value) if isinstance(value, (int, float)) else None


def link_bandwidth_gbps(
    *, pcie_gen: int = DEFAULT_PCIE_GEN, cache_file: Path = LINK_CACHE_FILE, refresh: bool = False,
    device: torch.device | str | None = None,
) -> float:
    """Pinned host->device GB/s of CUDA `device` (default: the current one), measured once per
    GPU name and cached in `cache_file`; without a GPU, `PCIE_DEFAULTS[pcie_gen]`."""
    if not torch.cuda.is_available():
        return PCIE_DEFAULTS[pcie_gen]
    device = _cuda_device(device)
    name = torch.cuda.get_device_name(device)
    cached = _read_link_cache(cache_file)
    if not refresh and isinstance(cached.get(name), (int, float)):
        return float(cached[name])
    measured = measure_link_gbps(device=device)
    cached[name] = round(measured, 2)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cached, indent=2, sort_keys=True))
    tmp.replace(cache_file)
    return measured


# --------------------------------------------------------------------------------------
# The plan table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    mode: str
    resident_layers: int
    streamed_layers: int
    vram_bytes: int
    host_ram_bytes: int
    ms_per_frame: float
    rtf: float
    note: str = ""
    prefetch_depth: int = 2


def plan_table(
    config: VibeVoiceConfig,
    budget_bytes: int,
    stream_dtype: StreamDtype = "bf16",
    *,
    link_gbps: float | None = None,
    resident_ms: float | None = None,
    decoder_ms: float | None = None,
    prefetch_depth: int | None = None,
    pinned: bool = True,
    embed_on_host: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    workload: Workload = DEFAULT_WORKLOAD,
) -> list[PlanRow]:
    """One row for auto and one per preset. A mode that does not fit the budget is listed
    with the note "does not fit (needs X GB)" (auto then shows the minimum plan).
    `prefetch_depth=None`: auto chooses its ring depth, presets use depth 2."""
    n = config.text_config.num_hidden_layers
    link = link_bandwidth_gbps() if link_gbps is None else link_gbps

    def row(mode: str, plan: OffloadPlan) -> PlanRow:
        est = estimate_for_workload(config, plan, dtype, workload)
        ms = predict_ms_per_frame(config, plan, link, resident_ms, decoder_ms=decoder_ms, dtype=dtype)
        fits = est.total_vram <= budget_bytes
        frames = plan.in_frames()
        extended = f"frames: {frames.resident_layers} resident, depth {frames.ring_slots(n)}"
        notes = [extended] if frames != plan else []
        if plan.encoded_residents:
            notes.insert(0, "residents kept packed")
        if not fits:
            notes.append(f"does not fit (needs {_gb(est.total_vram)} GB)")
        return PlanRow(
            mode=mode,
            resident_layers=plan.resident_layers,
            streamed_layers=n - plan.resident_layers,
            vram_bytes=est.total_vram,
            host_ram_bytes=est.host_ram,
            ms_per_frame=ms,
            rtf=real_time_factor(config, ms),
            note="; ".join(notes),
            prefetch_depth=plan.ring_slots(n),
        )

    options = dict(stream_dtype=stream_dtype, pinned=pinned, embed_on_host=embed_on_host)
    depth = 2 if prefetch_depth is None else prefetch_depth
    try:
        auto = plan_auto(
            config, budget_bytes, dtype=dtype, workload=workload, prefetch_depth=prefetch_depth,
            link_gbps=link, resident_ms=resident_ms, decoder_ms=decoder_ms, **options,
        )
    except PlanError:
        auto = _auto_minimum(prefetch_depth=depth, **options)
    rows = [row("auto", auto)]
    for name in PRESETS:  # the plans the presets really run, unchecked: the row says whether they fit
        rows.append(row(name, plan_preset(config, name, None, prefetch_depth=depth, dtype=dtype, workload=workload, **options)))
    return rows


def format_table(rows: Sequence[PlanRow]) -> str:
    header = ("mode", "resident", "streamed", "depth", "VRAM GB", "host RAM GB", "ms/frame", "RTF", "note")
    cells = [header] + [
        (
            r.mode, str(r.resident_layers), str(r.streamed_layers), str(r.prefetch_depth) if r.streamed_layers else "-",
            _gb(r.vram_bytes), _gb(r.host_ram_bytes), f"{r.ms_per_frame:.1f}", f"{r.rtf:.2f}", r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------
# Packaged configs and the `table` CLI subcommand
# --------------------------------------------------------------------------------------

SIZES = ("1.5B", "Large")
_SIZE_BY_SHAPE = {(1536, 28): "1.5B", (3584, 28): "Large"}  # (hidden, layers) of the releases
CONFIGS_DIR = Path(__file__).parent / "configs"


def load_size_config(size: str) -> VibeVoiceConfig:
    """The released model's config, copied into the package so no model folder is needed."""
    if size not in SIZES:
        raise PlanError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    path = CONFIGS_DIR / f"VibeVoice-{size}.json"
    raw = json.loads(path.read_text())
    return build_config(raw, detect_layout(raw, path), path)


def _vram_arg(text: str) -> int:
    try:
        return parse_vram(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_table_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `table`: the plans auto and each preset would give, with VRAM, host RAM and speed."""
    parser = subparsers.add_parser(
        "table",
        help="show the offload plans for a VRAM budget",
        description="Estimated VRAM, host RAM and speed of the auto plan and each preset.",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, metavar="DIR", help="a VibeVoice model folder (its config.json)")
    model.add_argument("--size", choices=SIZES, help="a released model's config (default: Large)")
    parser.add_argument("--vram", type=_vram_arg, help="VRAM budget, e.g. 12GB (default: 90%% of the GPU's free VRAM)")
    parser.add_argument("--stream-dtype", choices=STREAM_DTYPES, default="bf16", help="how streamed layers cross the link")
    parser.add_argument("--link-gbps", type=float, help="pinned host->device GB/s (default: measured, or the PCIe 4 figure)")
    parser.add_argument(
        "--minutes", type=float, default=DEFAULT_MINUTES,
        help=f"audio length the KV cache must hold (default {DEFAULT_MINUTES:g}; 2 speakers with 30 s voice clips)",
    )
    parser.set_defaults(func=run_table_command)
    return parser


def resident_frame_note(config: VibeVoiceConfig) -> str:
    """Where the size's T_resident comes from: "measured: ..." or "DEFAULT, not measured: ..."."""
    frame = resident_frame(config)
    return f"{'measured' if frame.measured else 'DEFAULT, not measured'}: {frame.source}"


def _resident_line(config: VibeVoiceConfig) -> str:
    return f"T_resident {resident_frame(config).ms:.1f} ms/frame ({resident_frame_note(config)})"


def run_table_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.model)[0] if args.model else load_size_config(args.size or "Large")
        if args.vram is not None:
            budget, budget_source = args.vram, "--vram"
        else:
            free = free_vram_bytes()
            budget, budget_source = budget_from_free(free), f"90% of {_gb(free)} GB free"
    except VibeVoiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.link_gbps is not None:
        link, link_source = args.link_gbps, "--link-gbps"
    elif torch.cuda.is_available():
        link, link_source = link_bandwidth_gbps(), f"measured on {torch.cuda.get_device_name()}"
    else:
        link, link_source = PCIE_DEFAULTS[DEFAULT_PCIE_GEN], f"PCIe {DEFAULT_PCIE_GEN} default, no GPU to measure"
    workload = Workload.for_minutes(args.minutes)
    rows = plan_table(config, budget, args.stream_dtype, link_gbps=link, workload=workload)
    print(
        f"{model_label(config)}, budget {_gb(budget)} GB ({budget_source}), stream {args.stream_dtype}, "
        f"link {link:.1f} GB/s ({link_source}), {args.minutes:g} min of audio "
        f"({workload.max_frames} frames)\n"
        f"{_resident_line(config)}; auto chooses its ring depth, presets use depth 2; "
        f"RTF = ms/frame / {frame_ms(config):.2f}"
    )
    print(format_table(rows))
    return 0

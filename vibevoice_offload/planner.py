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
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn
from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

from .config import SAMPLE_RATE, build_config, detect_layout, hop_length, load_config
from .errors import VibeVoiceError
from .plan import OffloadPlan, StreamDtype

GB = 10**9
MiB = 2**20

FP8_DTYPE = torch.float8_e4m3fn
FP8_SCALE_DTYPE = torch.float32  # one scale per output row of each streamed nn.Linear
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
class _LayerCensus:
    linear_weight_numel: int  # elements of all nn.Linear weights (fp8-quantisable)
    linear_rows: int  # sum of out_features: one fp8 scale each
    other_numel: int  # biases and norms: stay in the model dtype


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
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        linear_weight_numel = sum(m.weight.numel() for m in linears)
        total = sum(p.numel() for p in layer.parameters())
        layers.append(_LayerCensus(linear_weight_numel, sum(m.out_features for m in linears), total - linear_weight_numel))
    conv_cache = {
        "acoustic_decoder": _conv_cache_elements(model.model.audio_tower.decoder),
        "semantic_encoder": _conv_cache_elements(model.model.semantic_tokenizer_encoder),
    }
    return _Census(param_numel, buffer_bytes, tuple(layers), conv_cache)


def _census(config: VibeVoiceConfig) -> _Census:
    key = config.to_json_string()
    if key not in _CENSUS_CACHE:
        _CENSUS_CACHE[key] = _take_census(config)
    return _CENSUS_CACHE[key]


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each part of the model in one model dtype. Floating parameters count
    `numel x dtype.itemsize`; buffers count in their own dtype (float32 tables)."""

    layers: tuple[int, ...]
    """Each decoder layer in the model dtype."""
    layers_fp8: tuple[int, ...]
    """Each decoder layer as streamed in fp8: nn.Linear weights at 1 byte per element,
    plus one float32 scale per output row, plus biases and norms in the model dtype."""
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
        return self.layers_fp8[index] if stream_dtype == "fp8" else self.layers[index]


def model_sizes(config: VibeVoiceConfig, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
    """Byte sizes of every part of the model; the meta-device census is cached per config."""
    census = _census(config)
    itemsize = dtype.itemsize

    def part(name: str) -> int:
        return census.param_numel.get(name, 0) * itemsize + census.buffer_bytes.get(name, 0)

    layers = tuple(part(f"layer.{i}") for i in range(len(census.layers)))
    layers_fp8 = tuple(
        c.linear_weight_numel * FP8_DTYPE.itemsize + c.linear_rows * FP8_SCALE_DTYPE.itemsize + c.other_numel * itemsize
        + census.buffer_bytes.get(f"layer.{i}", 0)
        for i, c in enumerate(census.layers)
    )
    return ModelSizes(
        layers=layers,
        layers_fp8=layers_fp8,
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

# Prompt tokens besides the script text and the voice frames, counted by hand on the prompt
# in VIBEVOICE.md and rounded up: the system line (~22 tokens), " Voice input:\n",
# " Text input:\n", " Speech output:\n" and the final speech start (~13).
PROMPT_FIXED_TOKENS = 48
# Per speaker: " Speaker {i}:", speech start, speech end, "\n" (~6).
PROMPT_TOKENS_PER_SPEAKER = 8

FRAMES_PER_MINUTE = 450  # 7.5 frames per second (3200-sample frames at 24 kHz)
# About 150 spoken words a minute plus the " Speaker k:" line prefixes: an assumption for
# sizing the prompt when the script is not known yet (the nodes pass the real count).
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
    hidden, inter, heads, head_dim = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.head_dim
    kv_dim = tc.num_key_value_heads * head_dim
    stream = 4 * q_len * hidden
    repeated = 0 if q_len == 1 else 2 * heads * kv_len * head_dim
    attention = (
        q_len * (hidden + 2 * kv_dim) + 2 * q_len * (hidden + kv_dim) + repeated + 2 * heads * q_len * kv_len + q_len * hidden
    )
    mlp = 3 * q_len * inter
    elements = batch * (stream + max(attention, mlp))
    return elements * itemsize + batch * q_len * kv_len + batch * 2 * q_len * head_dim * 4


def _conv_extents(tokenizer_config, samples: int) -> list[tuple[int, int]]:
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


def _conv_stack_peak_bytes(tokenizer_config, samples: int, itemsize: int) -> int:
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

ALLOCATOR_SLACK_FRACTION = Fraction(5, 100)
ALLOCATOR_SLACK_FIXED = 64 * MiB


@dataclass(frozen=True)
class Estimate:
    """Peak VRAM and host RAM of one generation under one plan, in bytes.

    Counts what PyTorch's caching allocator hands out; the CUDA context is not counted
    (ComfyUI's budget already excludes it; `budget_from_free` leaves headroom for it).
    """

    resident_weights: int
    """On the GPU for the whole run, model dtype: the resident decoder layers, final norm,
    embed_tokens (unless `embed_on_host`), the 4-row lm_head slice (the full lm_head never
    goes to the GPU), diffusion head, acoustic decoder, semantic encoder, both connectors,
    and `other` (scalars, rotary buffers)."""
    slots: int
    """The streaming ring (0 when nothing is streamed): prefetch_depth x the largest
    streamed layer in the model dtype; for fp8 also prefetch_depth fp8 staging buffers (the
    layer's fp8 bytes incl. scales) and one model-dtype scratch of the largest nn.Linear
    weight for dequantisation."""
    kv_cache: int
    """Both CFG branches, ALL decoder layers (streamed layers keep their KV on the GPU):
    (positive positions prompt_len + max_frames, plus negative positions max_frames + 1)
    x layers x 2 (K and V) x kv_heads x head_dim x dtype bytes."""
    prefill_activations: int
    """The prompt pass of the positive branch (`_decoder_pass_bytes` with q = kv = prompt_len,
    batch 1) + logits of the 4-row slice for every prompt position (prompt_len x 4 x 4 bytes,
    float32)."""
    acoustic_encoder_peak: int
    """Encoding the longest voice clip before the prompt pass (the encoder is on the GPU
    only then): encoder weights + the clip as float32 and in the model dtype + the conv
    stack's peak activations (`_conv_stack_peak_bytes`)."""
    diffusion_and_tokenizer_workspace: int
    """Per-frame transients, summed: one decode step of both branches (`_decoder_pass_bytes`
    with q = 1, kv = longest branch, batch 2; plus 2 x 4 float32 logits); one layer's K and
    V of the positive branch copied while DynamicCache concatenates; one diffusion-head step
    (`_diffusion_bytes`); the conv stack's peak on one frame (hop samples); and the
    streaming conv caches of the acoustic decoder and semantic encoder (batch 1)."""
    allocator_slack: int
    """Fragmentation and rounding: 5% of the larger phase + 64 MiB."""
    total_vram: int
    """max(prefill phase, frame phase) + allocator_slack."""
    host_ram: int
    """Host memory the plan holds: the streamed layers' slabs in the stream dtype (exact
    bytes; pinned or pageable per the plan), the acoustic encoder (parked on the host between
    prompts), embed_tokens if `embed_on_host`, and, with `keep_host_copy`, a model-dtype
    copy of everything on the GPU plus the full lm_head (so ComfyUI can unload without
    re-reading the checkpoint)."""

    @property
    def prefill_phase(self) -> int:
        """Voice encoding, then the prompt pass: the encoder is released before the first
        decoder layer runs, so the two take the max, not the sum."""
        return self.resident_weights + self.slots + self.kv_cache + max(self.prefill_activations, self.acoustic_encoder_peak)

    @property
    def frame_phase(self) -> int:
        return self.resident_weights + self.slots + self.kv_cache + self.diffusion_and_tokenizer_workspace


def kv_cache_bytes(config: VibeVoiceConfig, positions: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV cache of one branch holding `positions` positions in every decoder layer."""
    tc = config.text_config
    return positions * tc.num_hidden_layers * 2 * tc.num_key_value_heads * tc.head_dim * dtype.itemsize


def estimate(
    config: VibeVoiceConfig,
    plan: OffloadPlan,
    *,
    dtype: torch.dtype = torch.bfloat16,
    voice_samples: int | Sequence[int],
    max_frames: int,
    text_tokens: int,
    keep_host_copy: bool = False,
) -> Estimate:
    """Peak VRAM and host RAM for generating `max_frames` frames with `plan`.

    `voice_samples` is each speaker's clip length in samples (an int means one clip).
    """
    num_layers = config.text_config.num_hidden_layers
    plan.validate(num_layers)
    sizes = model_sizes(config, dtype)
    itemsize = dtype.itemsize
    r = plan.resident_layers
    streamed = range(r, num_layers)

    resident = (
        sum(sizes.layers[:r]) + sizes.norm + (0 if plan.embed_on_host else sizes.embed_tokens) + sizes.lm_head_slice
        + sizes.diffusion_head + sizes.acoustic_decoder + sizes.semantic_encoder
        + sizes.acoustic_connector + sizes.semantic_connector + sizes.other
    )

    slots = 0
    if streamed:
        slots = plan.prefetch_depth * max(sizes.layers[i] for i in streamed)
        if plan.fp8:
            tc = config.text_config
            largest_linear = max(tc.hidden_size, tc.intermediate_size) * min(tc.hidden_size, tc.intermediate_size)
            largest_linear = max(largest_linear, tc.hidden_size * tc.hidden_size)
            slots += plan.prefetch_depth * max(sizes.layers_fp8[i] for i in streamed) + largest_linear * itemsize

    prompt_len = prompt_length(config, voice_samples, text_tokens)
    positive = prompt_len + max_frames
    kv = kv_cache_bytes(config, positive, dtype) + kv_cache_bytes(config, max_frames + 1, dtype)

    prefill = _decoder_pass_bytes(config, prompt_len, prompt_len, 1, itemsize) + prompt_len * LM_HEAD_ROWS * 4

    clips = _clips(voice_samples)
    longest = max(clips, default=0)
    encoder_peak = 0
    if longest:
        encoder_peak = (
            sizes.acoustic_encoder + longest * (4 + itemsize) + _conv_stack_peak_bytes(config.audio_config, longest, itemsize)
        )

    census = _census(config)
    hop = hop_length(config)
    tc = config.text_config
    workspace = (
        _decoder_pass_bytes(config, 1, positive, 2, itemsize) + 2 * LM_HEAD_ROWS * 4
        + 2 * tc.num_key_value_heads * tc.head_dim * positive * itemsize
        + _diffusion_bytes(config, itemsize)
        + max(
            _conv_stack_peak_bytes(config.audio_config, hop, itemsize),
            _conv_stack_peak_bytes(config.semantic_config, hop, itemsize),
        )
        + (census.conv_cache_elements["acoustic_decoder"] + census.conv_cache_elements["semantic_encoder"]) * itemsize
    )

    base = resident + slots + kv
    peak = base + max(prefill, encoder_peak, workspace)
    slack = math.ceil(peak * ALLOCATOR_SLACK_FRACTION) + ALLOCATOR_SLACK_FIXED

    host = sum(sizes.stream_bytes(i, plan.stream_dtype) for i in streamed) + sizes.acoustic_encoder
    if plan.embed_on_host:
        host += sizes.embed_tokens
    if keep_host_copy:
        host += resident - sizes.lm_head_slice + sizes.lm_head
    return Estimate(
        resident_weights=resident,
        slots=slots,
        kv_cache=kv,
        prefill_activations=prefill,
        acoustic_encoder_peak=encoder_peak,
        diffusion_and_tokenizer_workspace=workspace,
        allocator_slack=slack,
        total_vram=peak + slack,
        host_ram=host,
    )

"""One planner-accuracy case: run a plan for real and set the planner's estimate beside it.

`python -m vibevoice_offload bench (--auto | --preset NAME | --layers N | --no-offload)`,
`bench/planner_accuracy.py` and `bench/offload_bench.py` use this module (the random model,
the prompt, the frame timer, the link probe, the budget emulation); it needs no ComfyUI.

A case: the model (random weights at a released size's real shapes, or a model folder),
a fixed prompt (2 speakers x 5 s of voice, a two-line script, a character-level tokenizer:
341 tokens at the real hop), a plan (auto, a preset, N resident layers, or everything
resident) and a VRAM budget. On CUDA the budget is emulated with
`torch.cuda.set_per_process_memory_fraction(budget / card memory)`, so the caching
allocator cannot reserve more than the budget; on a CPU device nothing is enforced or
measured about VRAM. The engine then loads and generates `frames` frames (10 diffusion
steps, cfg 1.3); the row compares:

- estimated VRAM (`Estimate.total_vram`) with the measured peak reserved memory;
- the estimated device weights (`Estimate.weights`) with the engine's `resident_bytes`, and
  the estimated host slabs with `engine.host_bytes` (both exact, on any device);
- `predict_ms_per_frame` with the median ms between frames after the first 3.

The planner plans for the run's real workload: the prompt's length and voice clips and
`frames` frames, so the KV caches in the estimate are the ones the run allocates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import planner
from .errors import VibeVoiceError
from .plan import STREAM_DTYPES, OffloadPlan

GB = planner.GB
SCRIPT = "Speaker 1: Hello, how are you today?\nSpeaker 2: Fine, thank you!"
VOICE_SECONDS = 5.0
STEPS, CFG = 10, 1.3
SKIP_FRAMES = 3  # frame deltas left out of the median: warm-up of the ring, allocator and kernels
MODES = ("auto", *planner.PRESETS, "manual", "no-offload")
ROW_KEYS = (
    "model", "mode", "stream_dtype", "budget_gb", "estimated_vram_gb", "measured_peak_reserved_gb",
    "predicted_ms_per_frame", "measured_ms_per_frame",
)
"""The keys issue 4 asks of every row of bench/results/<card>-<yyyymmdd>-planner.json."""


# ---------------------------------------------------------------------------------------------
# the model at real shapes, random weights, always speaking
# ---------------------------------------------------------------------------------------------


def build_random_model(config, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, draw_on: str | None = None) -> nn.Module:
    """VibeVoice at `config`'s shapes in host memory with random weights (drawn on the GPU
    when there is one: Large's 18.7 GB take seconds there, minutes on the CPU), edited by
    `make_speaking` so every step is a speech frame. Norms and scales are 1, std 1/sqrt(fan_in)."""
    from transformers import VibeVoiceForConditionalGeneration

    from .checkpoint import _materialise_computed_buffers

    draw_on = draw_on or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    model.eval()
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    for name, module in model.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            full = f"{name}.{attr}"
            if "norm" in full and attr == "weight" or full.endswith("act.weight") or "gamma" in attr or "scaling_factor" in full:
                host = torch.ones(p.shape, dtype=dtype)
            elif "bias_factor" in full:
                host = torch.zeros(p.shape, dtype=dtype)
            else:
                fan_in = max(p.numel() // max(p.shape[0], 1), 1) if p.dim() > 1 else 0
                std = 1.0 / math.sqrt(fan_in) if fan_in else 0.02
                if "embed_tokens" in full or "lm_head" in full:
                    std = 0.02
                host = (torch.randn(p.shape, generator=gen, device=draw_on, dtype=dtype) * std).cpu()
            module._parameters[attr] = nn.Parameter(host, requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _materialise_computed_buffers(model)
    make_speaking(model)
    if draw_on == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model


def make_speaking(model: nn.Module) -> None:
    """Hidden channel 0 carries a constant no decoder layer writes; only the speech-frame row
    of the (4-row) head reads it strongly, so every step is a frame. Unlike
    `synthetic.make_speaking` this also works with a tied head (1.5B): it edits only the four
    allowed rows."""
    cfg = model.config
    lm = model.model.language_model
    allowed = [cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id]
    with torch.no_grad():
        lm.embed_tokens.weight[:, 0] = 1.0
        for projector in (model.model.multi_modal_projector, model.model.semantic_connector):
            projector.linear_2.weight[0, :] = 0.0
            projector.linear_2.bias[0] = 0.5
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        lm.norm.weight[0] = 1.0
        head = model.lm_head.weight
        for token in allowed:
            head[token].zero_()
            head[token, 0] = 1.0
        head[cfg.audio_token_id, 0] = 4.0


def _tiny_raw_config() -> dict[str, Any]:
    from .synthetic import REAL_HOP_SHAPE, original_config

    # Six decoder layers, tiny widths, but the real hop (3200 samples: real prompt and frame lengths).
    return original_config(**REAL_HOP_SHAPE, layers=6)


def tiny_config():
    """The config of `tiny_random_model`."""
    from .config import Layout, build_config

    return build_config(_tiny_raw_config(), Layout.ORIGINAL)


def tiny_random_model(seed: int = 1) -> nn.Module:
    """The benchmarks' smoke-test model for a CPU (`tiny_config()`): float32 random weights
    edited by `make_speaking`."""
    from .synthetic import random_model

    model = random_model(_tiny_raw_config(), seed=seed).to(torch.float32)
    make_speaking(model)
    return model


def tiny_budgets(config, workload: planner.Workload, dtype: torch.dtype, *, embed_on_host: bool = False) -> list[int]:
    """VRAM budgets in bytes scaled to a small model (`tiny_random_model`): every decoder layer
    streamed (room for either stream dtype's ring), about half resident, all resident (the
    estimates of depth-2 rings)."""
    n = config.text_config.num_hidden_layers

    def need(resident: int, stream_dtype: str = "bf16") -> int:
        return planner.estimate_for_workload(config, OffloadPlan(resident, stream_dtype, embed_on_host=embed_on_host), dtype, workload).total_vram

    return [max(need(0), need(0, "fp8")) + 1000, need(n // 2), need(n)]


def bench_prompt(config, voice_seconds: float = VOICE_SECONDS, script: str = SCRIPT):
    """The fixed benchmark prompt: `script` with two seeded noise clips of `voice_seconds`,
    tokenised by the synthetic character-level tokenizer (no real tokenizer is needed)."""
    from .prompt import build_prompt
    from .synthetic import write_tokenizer
    from .tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_tokenizer(Path(tmp) / "tok"))
    g = torch.Generator().manual_seed(7)
    samples = round(voice_seconds * 24000)
    voices = {1: (torch.randn(1, samples, generator=g) * 0.1, 24000), 2: (torch.randn(1, samples, generator=g) * 0.1, 24000)}
    return build_prompt(tokenizer, config, script, voices)


def prompt_workload(config, prompt, frames: int) -> planner.Workload:
    """The planner's workload for exactly this prompt and frame count: the estimate's prompt
    length is `prompt.length` and its KV caches are the ones the frame loop allocates."""
    clips = tuple(int(m.sum()) for m in prompt.voice_mask)
    fixed = planner.prompt_length(config, clips, 0)
    return planner.Workload(voice_samples=clips, max_frames=frames, text_tokens=max(prompt.length - fixed, 0))


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def timed_frames(loop, prompt, frames: int, *, steps: int = STEPS, cfg: float = CFG, skip: int = SKIP_FRAMES) -> dict[str, Any]:
    """Generate `frames` frames; the median wall time between frames after the first `skip`
    (`ms_per_frame`), and the frame loop's own counts and mean (prefill excluded)."""
    from .frame_loop import GenerationSettings

    stamps: list[float] = []

    def on_frame(i, cap, chunk):
        stamps.append(time.perf_counter())

    result = loop.run(prompt, GenerationSettings(cfg=cfg, steps=steps, seed=1, max_frames=frames), on_frame)
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]
    body = deltas[skip:] if len(deltas) > skip + 2 else deltas
    return {
        "ms_per_frame": statistics.median(body) * 1000 if body else float("nan"),
        "frames": result.stats["frames"],
        "tokens": result.stats["tokens"],
        "prefill_ms": result.stats["prefill_ms"],
        "mean_ms_per_frame": result.stats["ms_per_frame"],
    }


def first_outputs(loop, prompt, settings) -> dict[str, torch.Tensor]:
    """Run `loop` on `prompt` and keep, as float32 on the host, the prompt pass's hidden
    states (both branches: "prefill") and the first frame's latent ("latent"): where a
    rounded stream format's error is measured. The first frame runs eagerly, before any CUDA
    graph is captured, so copying its latent out is allowed."""
    from unittest import mock

    from .decoder_pass import DecoderPass
    from .speech_frame import SpeechFrame

    seen: dict[str, torch.Tensor] = {}
    prompt_pass, sample = DecoderPass.run_rows, SpeechFrame._sample_latent

    def first_pass(self, inputs):
        out = prompt_pass(self, inputs)
        seen.setdefault("prefill", out.float().cpu())
        return out

    def first_latent(self):
        latent = sample(self)
        if "latent" not in seen:  # later calls may be under graph capture: no copies then
            seen["latent"] = latent.float().cpu()
        return latent

    with mock.patch.object(DecoderPass, "run_rows", first_pass), mock.patch.object(SpeechFrame, "_sample_latent", first_latent):
        loop.run(prompt, settings)
    return seen


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def result_stem(card: str) -> str:
    """`<card>-<yyyymmdd>`, the card's name in letters, digits and dashes: how the files in
    bench/results/ are named."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}-{datetime.date.today():%Y%m%d}"


def measure_h2d_gbps(nbytes: int = 1 << 30, repeats: int = 7, device: torch.device | str | None = None) -> float:
    """The benchmarks' link figure: `planner.measure_link_gbps` to `device` (default: the
    current CUDA device) over 1 GiB, median of 7, then the probe's device blocks given back
    so no case starts with them cached (its pinned slab is unpinned when freed)."""
    gbps = planner.measure_link_gbps(nbytes, repeats, device)
    torch.cuda.empty_cache()
    return gbps


def device_usable(device: str, quick: bool) -> bool:
    """Whether a benchmark script can run on `device` ("cuda" or "cpu"); if not, says why on
    stderr. A CPU runs only --quick (the tiny model): the real sizes would take hours."""
    if device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --quick)", file=sys.stderr)
        return False
    if device == "cpu" and not quick:
        print("the real sizes on a CPU would take hours: use --quick on a CPU", file=sys.stderr)
        return False
    return True


def empty_host_cache() -> None:
    """Give PyTorch's cached pinned blocks back (pin_memory() and pinned empties are cached)."""
    with contextlib.suppress(Exception):
        torch._C._host_emptyCache()


def warm_libraries() -> None:
    """Load cuBLAS, cuDNN and the attention kernels before the first case is measured."""
    x = torch.randn(2, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(x, x, x)
    torch.nn.functional.conv1d(torch.randn(1, 4, 32, device="cuda"), torch.randn(4, 4, 3, device="cuda"))
    torch.randn(64, 64, device="cuda") @ torch.randn(64, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@contextlib.contextmanager
def vram_budget(device: torch.device, budget_bytes: int | None) -> Iterator[None]:
    """Emulate a card of `budget_bytes` with the caching allocator's per-process fraction."""
    if device.type != "cuda" or budget_bytes is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.synchronize(device)
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaseRunner:
    """Runs cases on one model, reusing one engine per stream dtype (its host slabs are packed
    once; `set_plan` re-packs only layers that become streamed). Run cases of one stream dtype
    from most to fewest resident layers and the slabs are those of a freshly built engine."""

    model: nn.Module
    config: Any
    prompt: Any
    device: torch.device
    model_name: str
    link_gbps: float
    link_source: str
    dtype: torch.dtype = torch.bfloat16
    engine: Any = None

    def workload(self, frames: int) -> planner.Workload:
        return prompt_workload(self.config, self.prompt, frames)

    def plan(
        self,
        mode: str,
        budget_bytes: int | None,
        stream_dtype: str,
        frames: int,
        *,
        resident_layers: int | None = None,
        prefetch_depth: int | None = None,
        embed_on_host: bool = False,
        resident_ms: float | None = None,
    ) -> OffloadPlan:
        """The planner's plan for `mode` at this budget and this run's workload (PlanError if it
        does not fit). auto chooses its ring depth unless `prefetch_depth` is given; presets
        and manual plans use `prefetch_depth` or 2."""
        n = self.config.text_config.num_hidden_layers
        work = self.workload(frames)
        common = dict(stream_dtype=stream_dtype, embed_on_host=embed_on_host, dtype=self.dtype, workload=work)
        depth = prefetch_depth or 2
        if mode == "auto":
            if budget_bytes is None:
                raise planner.PlanError("auto needs a VRAM budget (--vram)")
            return planner.plan_auto(
                self.config, budget_bytes, prefetch_depth=prefetch_depth, link_gbps=self.link_gbps, resident_ms=resident_ms, **common,
            )
        if mode == "no-offload":
            return OffloadPlan(n, stream_dtype, depth, True, embed_on_host)
        if mode == "manual":
            return planner.plan_manual(self.config, resident_layers, prefetch_depth=depth, budget_bytes=budget_bytes, **common)
        return planner.plan_preset(self.config, mode, budget_bytes, prefetch_depth=depth, **common)

    def _engine_for(self, plan: OffloadPlan):
        from .offload import OffloadEngine

        if self.engine is not None and self.engine.plan.stream_dtype == plan.stream_dtype:
            self.engine.unload()
            self.engine.set_plan(plan)
            return self.engine
        self.close()
        self.engine = OffloadEngine(self.model, plan, self.device)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        empty_host_cache()

    def run(self, plan: OffloadPlan, *, mode: str, budget_bytes: int | None, frames: int, resident_ms: float | None = None) -> dict[str, Any]:
        """Run `plan` under the budget; the row of estimate against measurement."""
        from .frame_loop import FrameLoop

        n = self.config.text_config.num_hidden_layers
        est = planner.estimate(
            self.config, plan, dtype=self.dtype, voice_samples=self.workload(frames).voice_samples,
            max_frames=frames, text_tokens=self.workload(frames).text_tokens,
        )
        resident = planner.resident_frame(self.config)
        t_resident = resident.ms if resident_ms is None else resident_ms
        predicted = planner.predict_ms_per_frame(self.config, plan, self.link_gbps, t_resident, dtype=self.dtype)
        cuda = self.device.type == "cuda"
        row: dict[str, Any] = {
            "model": self.model_name,
            "mode": mode,
            "stream_dtype": plan.stream_dtype,
            "budget_gb": None if budget_bytes is None else budget_bytes / GB,
            "estimated_vram_gb": est.total_vram / GB,
            "measured_peak_reserved_gb": None,
            "predicted_ms_per_frame": predicted,
            "measured_ms_per_frame": None,
            "resident_layers": plan.resident_layers,
            "streamed_layers": n - plan.resident_layers,
            "prefetch_depth": plan.ring_slots(n),
            "embed_on_host": plan.embed_on_host,
            "compute_buffers": plan.compute_buffers if plan.staged else None,
            "encoded_residents": plan.encoded_residents,
            "frame_layers": plan.frame_layers,
            "frame_slots": plan.frame_slots,
            "frames_requested": frames,
            "estimated_weights_bytes": est.weights,
            "estimated_host_slab_bytes": est.host_slabs,
            "estimated_host_ram_gb": est.host_ram / GB,
            "t_resident_ms": t_resident,
            "t_resident_measured": resident.measured if resident_ms is None else True,
            "link_gbps": self.link_gbps,
            "device": str(self.device),
        }
        gc.collect()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            row["baseline_reserved_gb"] = torch.cuda.memory_reserved(self.device) / GB
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        engine = None
        try:
            with vram_budget(self.device, budget_bytes):
                engine = self._engine_for(plan)
                engine.load()
                row["measured_weights_bytes"] = engine.resident_bytes
                row["measured_host_slab_bytes"] = engine.host_bytes
                timing = timed_frames(FrameLoop(self.model, engine), self.prompt, frames)
                stats = engine.stats()
            row["measured_ms_per_frame"] = timing["ms_per_frame"]
            row["frames"] = timing["frames"]
            row["prefill_ms"] = timing["prefill_ms"]
            passes = max(stats["offload_passes"], 1)
            row["copy_ms_per_frame"] = stats.get("offload_copy_ms", 0.0) / passes
            row["wait_ms_per_frame"] = stats.get("offload_wait_ms", 0.0) / passes
            row["copy_link_gbps"] = stats.get("offload_link_gbps") or None
            row["decoder_pass_ms"] = stats.get("offload_decoder_pass_ms")
        except Exception as exc:  # noqa: BLE001 - a case that fails is a result (an OOM under the budget above all)
            oom = isinstance(exc, torch.OutOfMemoryError)
            row["error"] = ("OOM under the emulated budget: " if oom else "") + f"{type(exc).__name__}: {str(exc)[:400]}"
            if engine is not None:
                try:
                    engine.unload()
                except Exception:  # noqa: BLE001 - leave nothing half-loaded for the next case
                    self.engine = None
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        if cuda:
            row["measured_peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
            row["measured_peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            row["alloc_retries"] = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
            row["vram_ratio"] = row["measured_peak_reserved_gb"] / row["estimated_vram_gb"]
            if budget_bytes is not None:
                row["within_budget"] = row["measured_peak_reserved_gb"] * GB <= budget_bytes
        if row["measured_ms_per_frame"]:
            row["ms_ratio"] = row["measured_ms_per_frame"] / predicted
            row["rtf"] = row["measured_ms_per_frame"] / planner.frame_ms(self.config)
        if "measured_weights_bytes" in row:
            row["weights_exact"] = row["measured_weights_bytes"] == est.weights
            row["host_slabs_exact"] = row["measured_host_slab_bytes"] == est.host_slabs
        if self.engine is not None and self.engine.loaded:
            self.engine.unload()
        return row


def format_row(row: dict[str, Any]) -> str:
    """Estimate against measurement, two columns and their ratio."""

    def num(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def ratio(measured, estimated):
        return "" if measured is None or not estimated else f"{measured / estimated:.3f}"

    lines = [("", "estimate", "measured", "measured/estimate")]
    lines.append(("peak VRAM reserved GB", num(row["estimated_vram_gb"], 3), num(row["measured_peak_reserved_gb"], 3),
                  ratio(row["measured_peak_reserved_gb"], row["estimated_vram_gb"])))
    w_est, w_meas = row["estimated_weights_bytes"] / GB, row.get("measured_weights_bytes")
    lines.append(("device weights GB", num(w_est, 6), num(None if w_meas is None else w_meas / GB, 6), ratio(None if w_meas is None else w_meas / GB, w_est)))
    h_est, h_meas = row["estimated_host_slab_bytes"] / GB, row.get("measured_host_slab_bytes")
    lines.append(("host slabs GB", num(h_est, 6), num(None if h_meas is None else h_meas / GB, 6), ratio(None if h_meas is None else h_meas / GB, h_est)))
    lines.append(("ms per frame", num(row["predicted_ms_per_frame"], 1), num(row["measured_ms_per_frame"], 1),
                  ratio(row["measured_ms_per_frame"], row["predicted_ms_per_frame"])))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in lines
    )


def describe(row: dict[str, Any]) -> str:
    plan = f"{row['resident_layers']} resident / {row['streamed_layers']} streamed"
    if row["streamed_layers"]:
        plan += f", {row['stream_dtype']}, depth {row['prefetch_depth']}"
        if row.get("compute_buffers") == 1:
            plan += ", decoded on use"
    if row.get("encoded_residents"):
        plan += ", residents kept packed"
    if row.get("frame_layers") or row.get("frame_slots"):
        plan += f"; frames +{row['frame_layers']} resident, +{row['frame_slots']} slots"
    budget = "no budget" if row["budget_gb"] is None else f"budget {planner._gb(round(row['budget_gb'] * GB))} GB"
    return f"{row['model']}, {row['mode']}: {plan}, {budget}, {row.get('frames', row['frames_requested'])} frames on {row['device']}"


# ---------------------------------------------------------------------------------------------
# the `bench` CLI subcommand
# ---------------------------------------------------------------------------------------------


def add_bench_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench`: run one case and print the estimate against the measurement."""
    parser = subparsers.add_parser(
        "bench",
        help="run one offload plan and print the planner's estimate against the measurement",
        description=(
            "Runs one case (random weights at a released size's shapes, or a model folder), emulating the VRAM "
            "budget on CUDA with torch.cuda.set_per_process_memory_fraction, and prints estimated VRAM against "
            "the measured peak reserved, predicted ms per frame against measured, and their ratios."
        ),
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--auto", action="store_true", help="the planner's auto plan for the budget (it picks the ring depth)")
    mode.add_argument("--preset", choices=tuple(planner.PRESETS), help="a preset's share of resident layers")
    mode.add_argument("--layers", type=int, metavar="N", help="N resident decoder layers (manual)")
    mode.add_argument("--no-offload", action="store_true", help="every layer resident: measures T_resident")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, metavar="DIR", help="a VibeVoice model folder")
    model.add_argument("--size", choices=planner.SIZES, help="random weights at a released size's shapes (default: Large)")
    parser.add_argument("--vram", type=planner._vram_arg, help="VRAM budget, e.g. 8GB (default on CUDA: 90%% of the free VRAM)")
    parser.add_argument("--stream-dtype", choices=STREAM_DTYPES, default="bf16")
    parser.add_argument("--prefetch-depth", type=int, help="ring depth (default: auto chooses; presets and --layers use 2)")
    parser.add_argument("--embed-on-host", action="store_true", help="keep embed_tokens on the host")
    parser.add_argument("--frames", type=int, default=60, help="frames to generate (the first 3 are not timed)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="model dtype")
    parser.add_argument("--voice-seconds", type=float, default=VOICE_SECONDS, help="length of each of the two voice clips")
    parser.add_argument("--link-gbps", type=float, help="pinned host->device GB/s (default: measured in this run; CPU: the PCIe 4 figure)")
    parser.add_argument("--resident-ms", type=float, help="T_resident for the prediction (default: the planner's table)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the row as JSON")
    parser.set_defaults(func=run_bench_command)
    return parser


def _mode_of(args: argparse.Namespace) -> str:
    if args.auto:
        return "auto"
    if args.preset:
        return args.preset
    if args.no_offload:
        return "no-offload"
    return "manual"


def load_case_model(args_model: Path | None, size: str | None, dtype: str, device: torch.device):
    """(model, config, label) for a folder or a released size's shapes with random weights."""
    if args_model is not None:
        from .checkpoint import load_checkpoint

        cp = load_checkpoint(args_model, dtype)
        return cp.model, cp.config, planner.model_label(cp.config).removeprefix("VibeVoice-"), cp.dtype
    from .checkpoint import DTYPES

    config = planner.load_size_config(size or "Large")
    torch_dtype = DTYPES[dtype]
    model = build_random_model(config, dtype=torch_dtype, draw_on="cuda" if device.type == "cuda" else "cpu")
    return model, config, size or "Large", torch_dtype


def run_bench_command(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    mode = _mode_of(args)
    try:
        budget = args.vram
        budget_source = "--vram"
        if budget is None and device.type == "cuda":
            free = planner.free_vram_bytes(device.index or 0)
            budget, budget_source = planner.budget_from_free(free), f"90% of {free / GB:.2f} GB free"
        if args.link_gbps is not None:
            link, link_source = args.link_gbps, "--link-gbps"
        elif device.type == "cuda":
            warm_libraries()
            link, link_source = measure_h2d_gbps(device=device), "measured in this run"
        else:
            link = planner.PCIE_DEFAULTS[planner.DEFAULT_PCIE_GEN]
            link_source = f"PCIe {planner.DEFAULT_PCIE_GEN} default: a CPU device has no link; the prediction is for a GPU"
        model, config, label, dtype = load_case_model(args.model, args.size, args.dtype, device)
        prompt = bench_prompt(config, args.voice_seconds)
        runner = CaseRunner(model, config, prompt, device, label, link, link_source, dtype)
        plan = runner.plan(
            mode, budget, args.stream_dtype, args.frames, resident_layers=args.layers,
            prefetch_depth=args.prefetch_depth, embed_on_host=args.embed_on_host, resident_ms=args.resident_ms,
        )
    except VibeVoiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        row = runner.run(plan, mode=mode, budget_bytes=budget, frames=args.frames, resident_ms=args.resident_ms)
    finally:
        runner.close()
    row["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    row["link_source"] = link_source
    row["budget_source"] = budget_source if budget is not None else None
    source = "--resident-ms" if args.resident_ms is not None else planner.resident_frame_note(config)
    t_res = f"T_resident {row['t_resident_ms']:.1f} ms ({source})"
    print(describe(row) + (f" [{row['card']}]" if device.type == "cuda" else ""))
    print(f"link {link:.1f} GB/s ({link_source}); {t_res}")
    print(format_row(row))
    if device.type == "cpu":
        print("(cpu device: no VRAM to measure; the ms per frame prediction is for a GPU)")
    if row.get("error"):
        print(f"error: {row['error']}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=1))
        print(f"wrote {args.json}")
    return 1 if row.get("error") else 0

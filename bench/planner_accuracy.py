#!/usr/bin/env python
"""Planner accuracy on a GPU (issue 4): estimated VRAM and predicted speed against measurement.

For VibeVoice-1.5B and -Large (random bf16 weights at the real shapes, drawn on the GPU),
bf16 and fp8 streaming, budgets emulating 8, 12 and 16 GB cards
(`torch.cuda.set_per_process_memory_fraction(budget / card memory)`, budget = N x 10**9
bytes, the same number the planner plans for), and the modes auto and every preset, this
runs the planner's plan, measures it (vibevoice_offload/bench_case.py: peak reserved VRAM,
median ms per frame after the first 3 frames, 10 diffusion steps, cfg 1.3, 2 speakers x
5 s of voice, 341-token prompt) and writes

    <out>/<card>-<yyyymmdd>-planner.json

with `card`, `date`, `link_gbps` (pinned H2D measured in this run) and `t_resident_ms`
(measured here per size, no budget) at the top level, a `summary` against the issue's
targets (peak reserved within 5% of the estimate and never above the budget; ms per frame
within 15% of the prediction), and one row per (model, mode, stream dtype, budget) with
model, mode, stream_dtype, budget_gb, estimated_vram_gb, measured_peak_reserved_gb,
predicted_ms_per_frame, measured_ms_per_frame, and more (plan, exact weight and slab
bytes, copy waits, the prediction with this run's T_resident, allocator retries).

A preset that does not fit a budget gets a row with its estimate and "does not fit". A plan
that several (mode, budget) rows share (a preset that fits at 8 GB is the same plan at 12
and 16; 1.5B fits whole in all three) is run once, under the tightest of those budgets
(`measured_at_budget_gb`); `alloc_retries` = 0 means the allocator never hit the limit, so
its peak would be the same under any larger budget. Each stream dtype's cases run on one
engine from most to fewest resident layers, so every case's host slabs are those of a fresh
engine. Frames per case: 3 s of generation, 10..24 frames (fewer for the slow all-streamed
cases): `--dry-run` counts 30 runs and about 90 s of generation at 55 GB/s; with building
the random models, packing and fp8-quantising the host slabs on the CPU, about 4-5
minutes on an H100 or H200 (PCIe 5). The JSON is rewritten after every case, so a run cut
short keeps its rows.

On the GPU machine (the device tool's `run`; the GPU image lacks diffusers and nvidia-ml-py,
whose wheels travel in the ignored .whl/ folder), `bash bench/gpu_session.sh planner` first
checks the estimate against real CUDA allocations (tests/test_planner_engine.py's gpu
test), then runs this script; copy the JSON and the logs from the reply's files_at into
bench/results/ and commit them. T_resident is measured first and again last; the faster
run counts (the first case runs right after the model was built).
`python bench/planner_accuracy.py --dry-run` prints the case matrix and the
predicted generation time without a GPU.

Smoke test on a CPU (tiny model, budgets scaled to it, a few frames):

    python bench/planner_accuracy.py --device cpu --quick --out /tmp/planner-quick
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vibevoice_offload import planner  # noqa: E402
from vibevoice_offload.bench_case import (  # noqa: E402
    ROW_KEYS,
    CaseRunner,
    bench_prompt,
    build_random_model,
    describe,
    device_usable,
    empty_host_cache,
    measure_h2d_gbps,
    result_stem,
    tiny_budgets,
    tiny_config,
    tiny_random_model,
    warm_libraries,
)
from vibevoice_offload.plan import OffloadPlan  # noqa: E402

GB = planner.GB
SIZES = ("1.5B", "Large")  # 1.5B first: its T_resident is the measurement the planner lacks
BUDGETS_GB = (8, 12, 16)
STREAM_DTYPES = ("bf16", "fp8")
MODES = ("auto", *planner.PRESETS)
SECONDS_PER_CASE = 3.0
MIN_FRAMES, MAX_FRAMES = 10, 24
VRAM_TOLERANCE, SPEED_TOLERANCE = 0.05, 0.15  # issue 4


def log(*args) -> None:
    print(*args, flush=True)


def frames_for(predicted_ms: float, quick: bool) -> int:
    if quick:
        return 4
    return int(min(MAX_FRAMES, max(MIN_FRAMES, round(SECONDS_PER_CASE * 1000 / predicted_ms))))


def plan_key(plan: OffloadPlan, n: int) -> tuple:
    streamed = n - plan.resident_layers
    return (plan.resident_layers, plan.stream_dtype if streamed else "-", plan.ring_slots(n), plan.embed_on_host,
            plan.frame_layers, plan.frame_slots, plan.compute_buffers if plan.staged and streamed else None, plan.encoded_residents)


class Accuracy:
    def __init__(self, args) -> None:
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            warm_libraries()
            self.card = torch.cuda.get_device_name(self.device)
            self.link = measure_h2d_gbps()
            self.link_source = "pinned H2D measured in this run (1 GiB, median of 7)"
        else:
            self.card = "cpu"
            self.link = planner.PCIE_DEFAULTS[planner.DEFAULT_PCIE_GEN]
            self.link_source = "PCIe 4 default (cpu device: no link; predictions are for a GPU)"
        self.date = datetime.date.today().strftime("%Y%m%d")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{result_stem(self.card)}-planner{'-quick' if args.quick else ''}.json"
        self.rows: list[dict] = []
        self.t_resident: dict[str, float] = {}
        self.decoder_ms: dict[str, float] = {}  # the decoder pass inside T_resident (GPU timeline)
        self.started = time.perf_counter()
        log(f"card {self.card}; link {self.link:.1f} GB/s ({self.link_source}); torch {torch.__version__}; writing {self.path}")

    # -- output ------------------------------------------------------------------------------
    def summary(self) -> dict:
        measured = [r for r in self.rows if r.get("measured_ms_per_frame") and r["mode"] != "no-offload"]
        vram = [r for r in measured if r.get("measured_peak_reserved_gb") is not None]

        def vram_ok(r):
            est, got = r["estimated_vram_gb"], r["measured_peak_reserved_gb"]
            return abs(got - est) <= VRAM_TOLERANCE * est

        def budget_ok(r):
            return r["budget_gb"] is None or r["measured_peak_reserved_gb"] <= r["budget_gb"] + 1e-12

        def speed_ok(r, key="predicted_ms_per_frame"):
            return r.get(key) is not None and abs(r["measured_ms_per_frame"] / r[key] - 1) <= SPEED_TOLERANCE

        return {
            "runs": sum(1 for r in self.rows if r.get("measured_ms_per_frame") and r.get("measured_at_budget_gb", r["budget_gb"]) == r["budget_gb"]),
            "cases_measured": len(measured),
            "cases_failed": [f"{r['model']} {r['mode']} {r['stream_dtype']} {r['budget_gb']}: {r['error']}" for r in self.rows if r.get("error") and not r.get("does_not_fit")],
            "vram_within_5pct": sum(map(vram_ok, vram)),
            "vram_at_or_below_estimate": sum(r["measured_peak_reserved_gb"] <= r["estimated_vram_gb"] for r in vram),
            "vram_within_budget": sum(map(budget_ok, vram)),
            "vram_ratio_range": [min((r["vram_ratio"] for r in vram), default=None), max((r["vram_ratio"] for r in vram), default=None)],
            "speed_within_15pct": sum(map(speed_ok, measured)),
            "speed_within_15pct_with_run_t_resident": sum(speed_ok(r, "predicted_ms_per_frame_run_t_resident") for r in measured),
            "ms_ratio_range": [min((r["ms_ratio"] for r in measured), default=None), max((r["ms_ratio"] for r in measured), default=None)],
            "weights_exact": sum(bool(r.get("weights_exact")) for r in measured),
            "host_slabs_exact": sum(bool(r.get("host_slabs_exact")) for r in measured),
            "wall_s": round(time.perf_counter() - self.started, 1),
        }

    def write(self) -> None:
        doc = {
            "card": self.card,
            "date": self.date,
            "link_gbps": self.link,
            "link_source": self.link_source,
            "torch": torch.__version__,
            "t_resident_ms": self.t_resident,
            "decoder_pass_ms": self.decoder_ms,
            "quick": self.args.quick,
            "row_keys": list(ROW_KEYS),
            "planner": {
                "resident_frame": {k: dataclasses.asdict(v) for k, v in planner.RESIDENT_FRAME.items()},
                "decode_ms_per_gb": planner.DECODE_MS_PER_GB,
                "allocator_slack": [float(planner.ALLOCATOR_SLACK_FRACTION), planner.ALLOCATOR_SLACK_FIXED],
            },
            "summary": self.summary(),
            "rows": self.rows,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.path)

    # -- models --------------------------------------------------------------------------------
    def model(self, size: str):
        if self.args.quick:
            return tiny_random_model(), tiny_config(), torch.float32, "tiny"
        config = planner.load_size_config(size)
        return build_random_model(config, draw_on=self.device.type), config, torch.bfloat16, size

    def budgets(self, runner: CaseRunner) -> list[int]:
        if not self.args.quick:
            return [b * GB for b in BUDGETS_GB]
        return tiny_budgets(runner.config, runner.workload(MAX_FRAMES), runner.dtype)

    # -- the cases ----------------------------------------------------------------------------
    def run_size(self, size: str) -> None:
        gc.collect()
        empty_host_cache()
        t0 = time.perf_counter()
        model, config, dtype, label = self.model(size)
        prompt = bench_prompt(config, 1.0 if self.args.quick else 5.0)
        n = config.text_config.num_hidden_layers
        log(f"== {label}: built in {time.perf_counter() - t0:.1f} s; prompt {prompt.length} tokens; {n} layers")
        runner = CaseRunner(model, config, prompt, self.device, label, self.link, self.link_source, dtype)
        try:
            # T_resident on this card: everything resident, no budget; first and again last
            # (the first case runs right after the model was built), the faster counts.
            self.measure_resident(runner, n, label)
            budgets = self.budgets(runner)
            for stream_dtype in STREAM_DTYPES:
                self.run_dtype(runner, stream_dtype, budgets, n)
            self.measure_resident(runner, n, label)
        finally:
            runner.close()
            del model, runner
            gc.collect()
            empty_host_cache()

    def measure_resident(self, runner: CaseRunner, n: int, label: str) -> None:
        row = runner.run(OffloadPlan(n, "bf16"), mode="no-offload", budget_bytes=None, frames=MAX_FRAMES if not self.args.quick else 4)
        ms = row.get("measured_ms_per_frame")
        if ms and ms < self.t_resident.get(label, float("inf")):
            self.t_resident[label] = ms
            self.decoder_ms[label] = row["decoder_pass_ms"]
            for earlier in self.rows:  # the rows so far were predicted with the slower figure
                if earlier["model"] == label:
                    self.predict_with_run_t_resident(earlier, runner)
        self.add(row, runner)

    def run_dtype(self, runner: CaseRunner, stream_dtype: str, budgets: list[int], n: int) -> None:
        groups: dict[tuple, dict] = {}
        for budget in budgets:
            for mode in MODES:
                try:
                    plan = runner.plan(mode, budget, stream_dtype, MAX_FRAMES)
                except planner.PlanError as exc:
                    self.add_refusal(runner, mode, stream_dtype, budget, exc, n)
                    continue
                group = groups.setdefault(plan_key(plan, n), {"plan": plan, "rows": []})
                group["rows"].append((mode, budget))
        for group in sorted(groups.values(), key=lambda g: -g["plan"].resident_layers):
            plan = group["plan"]
            tightest = min(budget for _, budget in group["rows"])
            predicted = planner.predict_ms_per_frame(runner.config, plan, self.link, dtype=runner.dtype)
            frames = frames_for(predicted, self.args.quick)
            mode0 = group["rows"][0][0]
            try:
                row = runner.run(plan, mode=mode0, budget_bytes=tightest, frames=frames)
            except Exception as exc:  # noqa: BLE001 - keep going: the other cases still count
                log(traceback.format_exc(limit=4))
                row = {"model": runner.model_name, "mode": mode0, "stream_dtype": stream_dtype, "budget_gb": tightest / GB,
                       "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            for mode, budget in group["rows"]:
                shared = dict(row, mode=mode, budget_gb=budget / GB, measured_at_budget_gb=tightest / GB)
                if "within_budget" in row and shared.get("measured_peak_reserved_gb") is not None:
                    shared["within_budget"] = shared["measured_peak_reserved_gb"] * GB <= budget
                self.add(shared, runner, log_it=(mode, budget) == group["rows"][0])

    def add_refusal(self, runner, mode, stream_dtype, budget, exc, n) -> None:
        work = runner.workload(MAX_FRAMES)
        if mode == "auto":
            plan = OffloadPlan(0, stream_dtype)
        else:
            plan = OffloadPlan(planner.preset_resident_layers(mode, n), stream_dtype)
        est = planner.estimate(runner.config, plan, dtype=runner.dtype, voice_samples=work.voice_samples,
                               max_frames=work.max_frames, text_tokens=work.text_tokens)
        row = {
            "model": runner.model_name, "mode": mode, "stream_dtype": stream_dtype, "budget_gb": budget / GB,
            "estimated_vram_gb": est.total_vram / GB, "measured_peak_reserved_gb": None,
            "predicted_ms_per_frame": planner.predict_ms_per_frame(runner.config, plan, self.link, dtype=runner.dtype),
            "measured_ms_per_frame": None, "resident_layers": plan.resident_layers, "streamed_layers": n - plan.resident_layers,
            "does_not_fit": True, "error": f"does not fit: {exc}",
        }
        self.rows.append(row)
        self.write()
        log(f"ROW {runner.model_name} {mode} {stream_dtype} {budget / GB:g} GB: does not fit (needs {planner._gb(est.total_vram)} GB)")

    def predict_with_run_t_resident(self, row: dict, runner: CaseRunner) -> None:
        t_res = self.t_resident.get(runner.model_name)
        if t_res and row.get("resident_layers") is not None and "error" not in row:
            plan = OffloadPlan(
                row["resident_layers"], row["stream_dtype"], max(row.get("prefetch_depth") or 2, 2), True,
                row.get("embed_on_host", False), row.get("frame_layers", 0), row.get("frame_slots", 0),
                row.get("compute_buffers") or 2, bool(row.get("encoded_residents")),
            )
            row["predicted_ms_per_frame_run_t_resident"] = planner.predict_ms_per_frame(
                runner.config, plan, self.link, t_res, decoder_ms=self.decoder_ms.get(runner.model_name), dtype=runner.dtype,
            )

    def add(self, row: dict, runner: CaseRunner, log_it: bool = True) -> None:
        self.predict_with_run_t_resident(row, runner)
        self.rows.append(row)
        self.write()
        if log_it:
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k in (
                "estimated_vram_gb", "measured_peak_reserved_gb", "vram_ratio", "predicted_ms_per_frame", "measured_ms_per_frame",
                "ms_ratio", "wait_ms_per_frame", "alloc_retries", "weights_exact", "wall_s", "error")}
            log("ROW", describe(row) if "frames_requested" in row else row.get("mode"), json.dumps(brief))

    def run(self) -> None:
        for size in (("tiny",) if self.args.quick else self.args.models):
            self.run_size(size)
        self.write()
        log("SUMMARY", json.dumps(self.summary()))
        log(f"wrote {self.path}")


def dry_run(link_gbps: float, models) -> None:
    """The case matrix without a GPU: each (model, stream dtype) group's plans, predicted ms
    and frames, and the generation time they add up to (loading and packing come on top)."""
    total_ms, runs = 0.0, 0
    for size in models:
        config = planner.load_size_config(size)
        n = config.text_config.num_hidden_layers
        runner = CaseRunner(None, config, bench_prompt(config), torch.device("cpu"), size, link_gbps, "--link-gbps")
        total_ms += (MAX_FRAMES + 3) * planner.default_resident_ms(config)
        runs += 1  # no-offload: T_resident
        for stream_dtype in STREAM_DTYPES:
            groups: dict[tuple, list] = {}
            for budget in BUDGETS_GB:
                for mode in MODES:
                    try:
                        plan = runner.plan(mode, budget * GB, stream_dtype, MAX_FRAMES)
                    except planner.PlanError:
                        print(f"{size} {stream_dtype} {budget} GB {mode}: does not fit")
                        continue
                    groups.setdefault(plan_key(plan, n), [plan, []])[1].append(f"{mode}@{budget}")
            for plan, rows in sorted(groups.values(), key=lambda g: -g[0].resident_layers):
                ms = planner.predict_ms_per_frame(config, plan, link_gbps)
                frames = frames_for(ms, False)
                total_ms += (frames + 3) * ms  # + prefill and warm-up, about 3 frames
                runs += 1
                print(f"{size} {stream_dtype} r={plan.resident_layers} d={plan.prefetch_depth}: {ms:.0f} ms x {frames} frames  <- {', '.join(rows)}")
    print(f"{runs} runs, generation about {total_ms / 1000:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="a tiny model at the real hop, budgets scaled to it, 4 frames per case")
    parser.add_argument("--dry-run", action="store_true", help="print the case matrix and predicted times; no model, no GPU")
    parser.add_argument("--link-gbps", type=float, default=55.0, help="for --dry-run only (default 55: PCIe 5)")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args.link_gbps, args.models)
        return 0
    if not device_usable(args.device, args.quick):
        return 2
    Accuracy(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

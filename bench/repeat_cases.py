#!/usr/bin/env python
"""How much a host-bound frame drifts on this machine: identical plans, repeated in one process.

    python bench/repeat_cases.py [1.5B|Large] [--frames 40]

A 1.5B frame streams little and is bound by the host launching kernels, so its time follows
the host CPU; this runs the same plans twice in one process (resident bf16, fp8 with nothing
streamed, fp8 and bf16 with 19 layers streamed), each on a fresh engine, and records per
case the median ms per frame, the decoder pass on the GPU's timeline, and the garbage
collector's time (a full collection with a model loaded takes about 0.3 s). Writes
<out>/<card>-<yyyymmdd>-repeats-<size>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vibevoice_offload import planner  # noqa: E402
from vibevoice_offload.bench_case import bench_prompt, build_random_model, result_stem, timed_frames, warm_libraries  # noqa: E402
from vibevoice_offload.frame_loop import FrameLoop  # noqa: E402
from vibevoice_offload.offload import OffloadEngine  # noqa: E402
from vibevoice_offload.plan import OffloadPlan  # noqa: E402


class GcClock:
    """Time spent in each garbage-collector generation, through gc.callbacks."""

    def __init__(self) -> None:
        self.ms = {0: 0.0, 1: 0.0, 2: 0.0}
        self.count = {0: 0, 1: 0, 2: 0}
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms[info["generation"]] += (time.perf_counter() - self._start) * 1000
            self.count[info["generation"]] += 1

    def reset(self) -> None:
        self.ms = dict.fromkeys(self.ms, 0.0)
        self.count = dict.fromkeys(self.count, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", nargs="?", default="1.5B", choices=planner.SIZES)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    clock = GcClock()
    config = planner.load_size_config(args.size)
    model = build_random_model(config, draw_on="cuda")
    prompt = bench_prompt(config)
    warm_libraries()
    rows = []

    def case(name: str, plan: OffloadPlan) -> None:
        start = time.perf_counter()
        engine = OffloadEngine(model, plan, "cuda")
        engine.load()
        load_s = time.perf_counter() - start
        clock.reset()
        try:
            timing = timed_frames(FrameLoop(model, engine), prompt, args.frames)
            stats = engine.stats()
        finally:
            engine.close()
        row = {
            "case": name, "ms": round(timing["ms_per_frame"], 2), "mean_ms": round(timing["mean_ms_per_frame"], 2),
            "decoder_ms": round(stats.get("offload_decoder_pass_ms", 0), 2), "load_s": round(load_s, 1),
            "gc_ms": {g: round(v, 1) for g, v in clock.ms.items()}, "gc_count": dict(clock.count), "objects": len(gc.get_objects()),
        }
        print("ROW", json.dumps(row), flush=True)
        rows.append(row)

    n = config.text_config.num_hidden_layers
    case("resident", OffloadPlan(n, "bf16"))
    case("fp8 r28 (first fp8 engine)", OffloadPlan(n, "fp8"))
    case("fp8 r28", OffloadPlan(n, "fp8"))
    case("resident", OffloadPlan(n, "bf16"))
    case("fp8 r9 d2", OffloadPlan(9, "fp8", 2))
    case("bf16 r9 d2", OffloadPlan(9, "bf16", 2))
    case("fp8 r9 d2", OffloadPlan(9, "fp8", 2))
    path = Path(args.out) / f"{result_stem(torch.cuda.get_device_name())}-repeats-{args.size}.json"
    path.write_text(json.dumps({"card": torch.cuda.get_device_name(), "frames": args.frames, "rows": rows}, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

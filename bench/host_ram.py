#!/usr/bin/env python
"""Host RAM of the engine at a released model's real shapes, stage by stage.

    python bench/host_ram.py [1.5B|Large] [--resident 7] [--stream-dtype bf16|bf16-packed|fp8] [--device cpu|cuda]
    python bench/host_ram.py 1.5B --sequence


Builds the model with random weights in host memory, packs it with an `OffloadEngine` (on
the CPU its slabs are what a GPU engine pins), and records the process's anonymous RSS
(what it allocated; the mapped libraries' pages excluded) over the model's bytes: after
building, after packing while glibc still holds the replaced tensors' pages, and after
`host_slabs.return_freed_memory()` hands them back, as the engine does. With `--device
cuda` (CUDA initialised and its libraries warmed before the baseline) also the peak while
30 frames are generated and the level after, after `close()`, and after the model is
dropped: what of the excess is the model's and what the CUDA runtime's. Writes
<out>/<cpu|card>-<yyyymmdd>-host-ram-<size>.json.

`--sequence` (CPU): one model, engines of each stream dtype built and closed one after
another as the offload benchmark does, with the anonymous RSS peak while each packs
(`load()`) and while each is closed. Writes ...-host-ram-sequence-<size>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from offload_bench import RssPeak, rss_bytes  # noqa: E402

from vibevoice_offload.bench_case import bench_prompt, build_random_model, result_stem, warm_libraries  # noqa: E402
from vibevoice_offload.frame_loop import FrameLoop, GenerationSettings  # noqa: E402
from vibevoice_offload.offload import OffloadEngine, host_slabs  # noqa: E402
from vibevoice_offload.offload import engine as engine_module  # noqa: E402
from vibevoice_offload.plan import STREAM_DTYPES, OffloadPlan  # noqa: E402
from vibevoice_offload.planner import load_size_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", nargs="?", default="1.5B", choices=["1.5B", "Large"])
    parser.add_argument("--resident", type=int, default=7, help="decoder layers kept resident (the rest get stream-format slabs)")
    parser.add_argument("--stream-dtype", default="bf16", choices=STREAM_DTYPES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-cudnn", action="store_true", help="diagnosis: torch.backends.cudnn disabled (convolutions run torch's own kernels)")
    parser.add_argument("--sequence", action="store_true", help="engines of each stream dtype one after another on one model (CPU)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.sequence:
        return sequence(args.size, Path(args.out))
    torch.backends.cudnn.enabled = not args.no_cudnn

    cuda = args.device == "cuda"
    if cuda:
        warm_libraries()
    base = rss_bytes(anonymous=True)
    config = load_size_config(args.size)
    model, model_bytes = _random_model(config, args.device)
    built = rss_bytes(anonymous=True)
    engine = OffloadEngine(model, OffloadPlan(args.resident, args.stream_dtype), args.device)
    with mock.patch.object(engine_module, "return_freed_memory", lambda: None):  # the engine before this fix
        engine.load()
    gc.collect()
    packed = rss_bytes(anonymous=True)
    host_slabs.return_freed_memory()
    handed_back = rss_bytes(anonymous=True)
    row = {
        "model": args.size, "cudnn": torch.backends.cudnn.enabled, "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING", "default"), "resident_layers": args.resident, "stream_dtype": args.stream_dtype,
        "model_gb": model_bytes / 1e9, "host_slabs_gb": engine.host_bytes / 1e9,
        "anonymous_vs_model_built": (built - base) / model_bytes,
        "anonymous_vs_model_packed_pages_held": (packed - base) / model_bytes,
        "anonymous_vs_model_packed_pages_returned": (handed_back - base) / model_bytes,
    }
    if cuda:
        with RssPeak() as peak:
            FrameLoop(model, engine).run(bench_prompt(config), GenerationSettings(max_frames=30))
        gc.collect()
        row["anonymous_vs_model_generating_peak"] = (peak.peak_anonymous - base) / model_bytes
        row["anonymous_vs_model_after_generating"] = (rss_bytes(anonymous=True) - base) / model_bytes
    engine.close()
    gc.collect()
    row["anonymous_vs_model_closed"] = (rss_bytes(anonymous=True) - base) / model_bytes
    del engine, model
    gc.collect()
    host_slabs.return_freed_memory()
    row["anonymous_gb_over_base_model_dropped"] = (rss_bytes(anonymous=True) - base) / 1e9
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    stem = result_stem(torch.cuda.get_device_name()) if cuda else f"cpu-{time.strftime('%Y%m%d')}"
    out = Path(args.out) / f"{stem}-host-ram-{args.size}.json"
    device = torch.cuda.get_device_name() if cuda else "cpu"
    out.write_text(json.dumps({"device": device, "note": __doc__.strip().splitlines()[0], "rows": [row]}, indent=1))
    print("wrote", out)
    return 0


def _random_model(config, device: str):
    """The model with random weights in host memory, and its bytes (tied weights once)."""
    model = build_random_model(config, draw_on=device)
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    gc.collect()
    return model, model_bytes


def sequence(size: str, out_dir: Path) -> int:
    """Anonymous RSS over the model's bytes while engines of each stream dtype pack and close
    in turn on one CPU model (packed residents for bf16-packed, as `auto` plans them)."""
    base = rss_bytes(anonymous=True)
    model, model_bytes = _random_model(load_size_config(size), "cpu")
    rows = []
    plans = (OffloadPlan(10, "bf16"), OffloadPlan(12, "bf16-packed", encoded_residents=True), OffloadPlan(9, "fp8"))
    for plan in plans:
        before = rss_bytes(anonymous=True)
        engine = OffloadEngine(model, plan, "cpu")
        with RssPeak() as packing:
            engine.load()
        loaded = rss_bytes(anonymous=True)
        with RssPeak() as closing:
            engine.close()
            del engine
            gc.collect()
            host_slabs.return_freed_memory()
        rows.append({
            "stream_dtype": plan.stream_dtype, "resident_layers": plan.resident_layers, "encoded_residents": plan.encoded_residents,
            "anonymous_vs_model_before": (before - base) / model_bytes,
            "anonymous_vs_model_packing_peak": (packing.peak_anonymous - base) / model_bytes,
            "anonymous_vs_model_loaded": (loaded - base) / model_bytes,
            "anonymous_vs_model_closing_peak": (closing.peak_anonymous - base) / model_bytes,
        })
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    out = out_dir / f"cpu-{time.strftime('%Y%m%d')}-host-ram-sequence-{size}.json"
    out.write_text(json.dumps({"device": "cpu", "model": size, "model_gb": model_bytes / 1e9, "note": sequence.__doc__.split(chr(10))[0], "rows": rows}, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

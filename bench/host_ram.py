#!/usr/bin/env python
"""Host RAM of the engine's packing at a released model's real shapes, on the CPU.

    python bench/host_ram.py [1.5B|Large] [--resident 7] [--stream-dtype bf16|fp8]

Builds the model with random weights in host memory, packs it with an `OffloadEngine` on
the CPU (its slabs are what a GPU engine pins), and records the process's anonymous RSS
(what it allocated; the mapped libraries' pages excluded) over the model's bytes: after
building, after packing while glibc still holds the replaced tensors' pages, and after
`host_slabs.return_freed_memory()` hands them back, as the engine now does. Writes
<out>/cpu-<yyyymmdd>-host-ram-<size>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from offload_bench import rss_bytes  # noqa: E402

from vibevoice_offload.bench_case import build_random_model  # noqa: E402
from vibevoice_offload.offload import OffloadEngine, host_slabs  # noqa: E402
from vibevoice_offload.offload import engine as engine_module  # noqa: E402
from vibevoice_offload.plan import OffloadPlan  # noqa: E402
from vibevoice_offload.planner import load_size_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", nargs="?", default="1.5B", choices=["1.5B", "Large"])
    parser.add_argument("--resident", type=int, default=7, help="decoder layers kept resident (the rest get stream-format slabs)")
    parser.add_argument("--stream-dtype", default="bf16", choices=["bf16", "fp8"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)

    base = rss_bytes(anonymous=True)
    model = build_random_model(load_size_config(args.size), draw_on="cpu")
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    gc.collect()
    built = rss_bytes(anonymous=True)
    engine = OffloadEngine(model, OffloadPlan(args.resident, args.stream_dtype), "cpu")
    with mock.patch.object(engine_module, "return_freed_memory", lambda: None):  # the engine before this fix
        engine.load()
    gc.collect()
    packed = rss_bytes(anonymous=True)
    host_slabs.return_freed_memory()
    handed_back = rss_bytes(anonymous=True)
    row = {
        "model": args.size, "resident_layers": args.resident, "stream_dtype": args.stream_dtype,
        "model_gb": model_bytes / 1e9, "host_slabs_gb": engine.host_bytes / 1e9,
        "anonymous_vs_model_built": (built - base) / model_bytes,
        "anonymous_vs_model_packed_pages_held": (packed - base) / model_bytes,
        "anonymous_vs_model_packed_pages_returned": (handed_back - base) / model_bytes,
    }
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    out = Path(args.out) / f"cpu-{time.strftime('%Y%m%d')}-host-ram-{args.size}.json"
    out.write_text(json.dumps({"device": "cpu", "note": __doc__.strip().splitlines()[0], "rows": [row]}, indent=1))
    print("wrote", out)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

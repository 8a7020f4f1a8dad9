"""bench/offload_bench.py's CPU smoke run: the script the committed GPU results come from."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISSUE_KEYS = {"model", "method", "stream_dtype", "budget_gb", "ms_per_frame", "rtf", "peak_vram_allocated_gb",
              "peak_vram_reserved_gb", "host_ram_gb", "link_gbps", "bound_ms"}


def test_quick_cpu_run_writes_every_row_twice_with_the_issue_keys(tmp_path):
    """--device cpu --quick --repeat 2: this project's cases on the tiny model, each stream dtype
    a float32 model can stream, every budget, in two turns; a row per case, none failed."""
    run = subprocess.run([sys.executable, "bench/offload_bench.py", "--device", "cpu", "--quick", "--repeat", "2",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = tmp_path.glob("cpu-*.json")
    doc = json.loads(path.read_text())
    assert doc["card"] == "cpu" and doc["link_gbps_measured"] > 0
    rows = doc["rows"]
    assert all(ISSUE_KEYS <= set(r) and "error" not in r and r["ms_per_frame"] > 0 for r in rows), rows
    turns = [[(r["stream_dtype"], r["budget_gb"]) for r in rows if r["repeat"] == turn and not r.get("repeat_of_full")]
             for turn in (0, 1)]
    assert {dtype for dtype, _ in turns[0]} == {"bf16", "fp8"}
    assert len(turns[0]) >= 4 and turns[0] == turns[1]
    assert (tmp_path / path.with_suffix(".png").name).exists()

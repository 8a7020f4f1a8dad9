"""The main job end to end through a real ComfyUI: the example workflow on a synthetic model.

Starts the ComfyUI that scripts/setup.sh installed (CPU) with this pack in custom_nodes,
writes a small synthetic checkpoint (original layout, real 3200-sample hop, no tokenizer
files, so ComfyUI's bundled Qwen2.5 tokenizer is used) and two synthetic voices, queues
example_workflows/vibevoice_dialog_api.json through /prompt, waits on /history, and
copies the saved audio next to the library demo's output.

    .venv/bin/python scripts/workflow_demo.py [--out PATH] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

import soundfile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the ComfyUI process manager the tests use

from comfy_server import ComfyServer  # noqa: E402

from vibevoice_offload.cli import DEFAULT_CACHE, DEMO_SCRIPT, demo_voice  # noqa: E402
from vibevoice_offload.config import SAMPLE_RATE  # noqa: E402
from vibevoice_offload.synthetic import REAL_HOP_SHAPE, write_demo_checkpoint  # noqa: E402

MODEL = "VibeVoice-demo"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=str(REPO / ".cache" / "comfyui"), help="ComfyUI tree (scripts/setup.sh puts it here)")
    parser.add_argument("--out", default=str(DEFAULT_CACHE / "workflow-demo.flac"))
    parser.add_argument("--seconds", type=float, default=4.0, help="audio to generate")
    args = parser.parse_args()

    with ComfyServer(args.comfyui, log_path=DEFAULT_CACHE / "workflow-demo-comfyui.log") as server:
        model_dir = write_demo_checkpoint(server.models_dir / MODEL, **REAL_HOP_SHAPE)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / name).unlink()
        graph = json.loads((REPO / "example_workflows" / "vibevoice_dialog_api.json").read_text())
        for node, seconds, pitch in (("1", 1.0, 140.0), ("2", 1.2, 220.0)):
            name = graph[node]["inputs"]["audio"]
            soundfile.write(server.input_dir / name, demo_voice(seconds, pitch, int(node)), SAMPLE_RATE)
        graph["4"]["inputs"].update(model=MODEL, dtype="fp32")
        graph["5"]["inputs"].update(script=DEMO_SCRIPT, max_seconds=args.seconds)
        graph["6"]["inputs"]["filename_prefix"] = f"vibevoice-demo/{uuid.uuid4().hex[:8]}"
        print(f"ComfyUI {server.base_url}: queueing example_workflows/vibevoice_dialog_api.json")
        entry = server.wait(server.queue(graph), timeout=900)
        if entry["status"]["status_str"] != "success":
            print(json.dumps(entry["status"], indent=2)[-3000:], file=sys.stderr)
            print(server.log_tail(), file=sys.stderr)
            return 1
        (saved,) = entry["outputs"]["6"]["audio"]
        source = server.output_dir / saved["subfolder"] / saved["filename"]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out)
        (stats,) = entry["outputs"]["5"]["vibevoice_stats"]
    info = soundfile.info(str(out))
    print(f"wrote {out} ({info.duration:.2f} s at {info.samplerate} Hz) through a real ComfyUI workflow")
    print("run statistics: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

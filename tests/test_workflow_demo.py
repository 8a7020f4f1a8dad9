"""The README's main job: the example workflow end to end in a real ComfyUI."""

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.comfy
def test_workflow_demo_writes_the_dialog(tmp_path, comfyui_dir):
    out = tmp_path / "dialog.flac"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "workflow_demo.py"), "--comfyui", str(comfyui_dir), "--out", str(out), "--seconds", "0.8"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    info = soundfile.info(str(out))
    assert info.samplerate == 24000 and info.frames == 6 * 3200  # 0.8 s is six 3200-sample frames
    assert "through a real ComfyUI workflow" in run.stdout and "tokenizer qwen25_tokenizer" in run.stdout

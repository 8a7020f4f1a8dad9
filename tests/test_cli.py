"""The command line: the demo end to end, generate from WAV files, clear errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vibevoice_offload", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_demo_writes_a_24khz_wav_of_the_expected_length(tmp_path):
    run = cli("demo", "--cache", str(tmp_path), "--max-seconds", "1.2", "--steps", "3")
    assert run.returncode == 0, run.stderr
    audio, rate = soundfile.read(tmp_path / "demo.wav")
    assert rate == 24000
    assert len(audio) == 9 * 3200  # 1.2 s is exactly 9 frames of 3200 samples
    assert np.isfinite(audio).all() and audio.std() > 0
    assert "demo.wav" in run.stdout and "ms per frame" in run.stdout
    assert (tmp_path / "demo-model" / "config.json").is_file()


def test_generate_from_wav_files(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "a.wav", 0.1 * rng.standard_normal((800, 2)), 16000)
    soundfile.write(tmp_path / "b.wav", 0.1 * rng.standard_normal(600), 48000)
    (tmp_path / "script.txt").write_text("Speaker 1: Hi.\n[2]: Hello.\n")
    out = tmp_path / "out" / "dialog.wav"
    run = cli("generate", "--model", str(tiny_model_dir), "--script", str(tmp_path / "script.txt"),
              "--voice", f"1={tmp_path / 'a.wav'}", "--voice", f"2={tmp_path / 'b.wav'}", "--out", str(out),
              "--steps", "2", "--seed", "3", "--dtype", "fp32", "--max-seconds", str(6 * 4 / 24000))
    assert run.returncode == 0, run.stderr
    audio, rate = soundfile.read(out)
    assert rate == 24000 and len(audio) == 6 * 4
    assert "frame 6/6" in run.stderr  # the progress bar


@pytest.mark.parametrize("bad", ["model folder", "script", "voice file", "silent voice"])
def test_each_bad_input_is_one_line_naming_it(tmp_path, tiny_model_dir, bad):
    """One bad input per call, the others valid: the error is one line that names the bad
    path and what is wrong with it, and comes before the model is loaded where it can."""
    script, voice = tmp_path / "script.txt", tmp_path / "a.wav"
    script.write_text("Speaker 1: Hi.\n")
    soundfile.write(voice, 0.1 * np.random.default_rng(0).standard_normal(4000), 24000)
    model = tiny_model_dir
    if bad == "model folder":
        model = tmp_path / "missing"
        expected = f"{model}: model folder does not exist"
    elif bad == "script":
        script = tmp_path / "no-script.txt"
        expected = f"{script}: cannot read the script (No such file or directory)"
    elif bad == "voice file":
        voice = tmp_path / "x.wav"
        expected = f"{voice}: cannot read audio ("
    else:
        soundfile.write(voice, np.zeros(4000), 24000)
        expected = "voice clip for speaker 1 is silent"
    run = cli("generate", "--model", str(model), "--script", str(script), "--voice", f"1={voice}",
              "--out", str(tmp_path / "o.wav"), "--dtype", "fp32", "--device", "cpu")
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"error: {expected}") and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "o.wav").exists()


def test_table_lists_auto_and_every_preset():
    run = cli("table", "--size", "1.5B", "--vram", "4GB", "--stream-dtype", "bf16", "--link-gbps", "25")
    assert run.returncode == 0, run.stderr
    for mode in ("auto", "light", "moderate", "balanced", "aggressive", "extreme"):
        assert f"\n{mode} " in run.stdout


def test_generate_through_the_offload_engine_streams_and_matches_resident(tmp_path, tiny_model_dir):
    rng = np.random.default_rng(1)
    soundfile.write(tmp_path / "a.wav", 0.1 * rng.standard_normal(400), 24000)
    (tmp_path / "script.txt").write_text("Speaker 1: Hi there.\n")
    common = ["generate", "--model", str(tiny_model_dir), "--script", str(tmp_path / "script.txt"),
              "--voice", f"1={tmp_path / 'a.wav'}", "--steps", "2", "--dtype", "fp32", "--device", "cpu",
              "--max-seconds", str(5 * 4 / 24000)]
    resident = cli(*common, "--offload", "none", "--out", str(tmp_path / "resident.wav"))
    streamed = cli(*common, "--layers", "1", "--out", str(tmp_path / "streamed.wav"))
    assert resident.returncode == 0 and streamed.returncode == 0, resident.stderr + streamed.stderr
    a, _ = soundfile.read(tmp_path / "resident.wav", dtype="float32")
    b, _ = soundfile.read(tmp_path / "streamed.wav", dtype="float32")
    assert len(a) == 5 * 4 and np.array_equal(a, b)
    assert "3 of 4 layers streamed" in streamed.stdout and "0 of 4 layers streamed" in resident.stdout

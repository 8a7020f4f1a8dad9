"""`python -m vibevoice_offload generate | demo | table | bench`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch

from .config import SAMPLE_RATE
from .errors import ScriptError, VibeVoiceError
from .frame_loop import GenerationResult, GenerationSettings
from .pipeline import VibeVoice
from .plan import STREAM_DTYPES
from .planner import PRESETS, parse_vram

OFFLOAD_MODES = ("auto", *PRESETS, "none")

DEFAULT_CACHE = Path(os.environ.get("VIBEVOICE_OFFLOAD_CACHE", Path.home() / ".cache" / "vibevoice_offload"))

DEMO_SCRIPT = """Speaker 1: Welcome to the offloaded VibeVoice demo.
Speaker 2: Every frame streams the decoder layers it needs.
Speaker 1: And the voices come from two short reference clips.
"""


class ProgressBar:
    """A one-line text progress bar on stderr, updated per frame."""

    def __init__(self, stream=sys.stderr) -> None:  # noqa: ANN001 - a text stream
        self.stream = stream

    def __call__(self, frame: int, total: int, chunk: object) -> None:
        width = 30
        filled = int(width * frame / max(total, 1))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] frame {frame}/{total} ({frame / 7.5:.1f} s)")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")


def _parse_voice(spec: str) -> tuple[int, Path]:
    speaker, sep, path = spec.partition("=")
    if not sep or not speaker.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--voice expects N=path.wav, got {spec!r}")
    return int(speaker), Path(path)


def _read_voice(path: Path) -> tuple[np.ndarray, int]:
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise VibeVoiceError(f"{path}: cannot read audio ({exc})") from exc
    return data.T, rate


def _read_script(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"{path}: cannot read the script ({exc.strerror if isinstance(exc, OSError) else exc})") from exc


def _settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(cfg=args.cfg, steps=args.steps, seed=args.seed, max_seconds=args.max_seconds)


def _generate(model: VibeVoice, script: str, voices: dict, settings: GenerationSettings, out: Path, args: argparse.Namespace) -> GenerationResult:
    from .placement import offload_engine

    prompt = model.prompt(script, voices)
    engine = offload_engine(model, prompt, settings, mode=args.offload, resident_layers=args.layers,
                            stream_dtype=args.stream_dtype, budget_bytes=parse_vram(args.vram) if args.vram else None,
                            device=args.device)
    bar = ProgressBar()
    try:
        result = model.run(prompt, settings, executor=engine, on_frame=bar)
        result.stats.update(engine.stats())
    finally:
        bar.close()
        engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(out), result.waveform.numpy(), result.sample_rate)
    return result


def _report(out: Path, result: GenerationResult) -> None:
    stats = result.stats
    print(f"wrote {out} ({stats['audio_seconds']:.2f} s of audio at {result.sample_rate} Hz)")
    print(f"frames {stats['frames']}, {stats['ms_per_frame']:.1f} ms per frame, RTF {stats['rtf']:.2f}, stopped by {stats['stopped']}")
    if "offload_streamed_layers" in stats:
        layers = stats["offload_streamed_layers"] + stats["offload_resident_layers"]
        print(f"{stats['offload_streamed_layers']} of {layers} layers streamed ({stats['offload_stream_dtype']}), "
              f"{stats['offload_bytes_streamed'] / 1e9:.3f} GB over the link")


def cmd_generate(args: argparse.Namespace) -> int:
    # the inputs first: loading the model takes long, and a bad path should not wait for it
    script = _read_script(Path(args.script))
    voices = {speaker: _read_voice(path) for speaker, path in args.voice}
    model = VibeVoice.load(args.model, dtype=args.dtype)
    result = _generate(model, script, voices, _settings(args), Path(args.out), args)
    _report(Path(args.out), result)
    return 0


def demo_voice(seconds: float, pitch_hz: float, seed: int) -> np.ndarray:
    """A synthetic reference clip: a vowel-like harmonic tone with a little noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    tone = sum(np.sin(2 * np.pi * pitch_hz * k * t) / k for k in range(1, 6))
    return (0.3 * tone + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def cmd_demo(args: argparse.Namespace) -> int:
    from .synthetic import REAL_HOP_SHAPE, write_demo_checkpoint

    model_dir = Path(args.cache) / "demo-model"
    if not (model_dir / "config.json").is_file():
        write_demo_checkpoint(model_dir, **REAL_HOP_SHAPE)
        print(f"wrote a synthetic checkpoint (original layout) to {model_dir}")
    voices = {1: (demo_voice(1.0, 140.0, 1), SAMPLE_RATE), 2: (demo_voice(1.2, 220.0, 2), SAMPLE_RATE)}
    model = VibeVoice.load(model_dir, dtype="fp32")
    out = Path(args.out) if args.out else Path(args.cache) / "demo.wav"
    result = _generate(model, DEMO_SCRIPT, voices, _settings(args), out, args)
    _report(out, result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vibevoice_offload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_placement(p: argparse.ArgumentParser, device: str) -> None:
        p.add_argument("--device", default=device, help="cuda (offloaded to fit --vram) or cpu")
        p.add_argument("--offload", default="auto", choices=OFFLOAD_MODES, help="auto: most resident layers that fit; a preset; none: all resident")
        p.add_argument("--layers", type=int, default=None, help="resident decoder layers (overrides --offload)")
        p.add_argument("--stream-dtype", default="bf16", choices=STREAM_DTYPES, help="how streamed layers cross the link: bf16, bf16-packed (same bits, 3/4 of the bytes), fp8 (half the bytes, rounded)")
        p.add_argument("--vram", default=None, help="VRAM budget, e.g. 12GB (default: 90%% of free VRAM)")

    def add_sampling(p: argparse.ArgumentParser, max_seconds: float | None) -> None:
        p.add_argument("--steps", type=int, default=10, help="diffusion steps per frame")
        p.add_argument("--cfg", type=float, default=1.3, help="classifier-free guidance scale (1 = off)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-seconds", type=float, default=max_seconds, help="cap on generated audio (default: twice the prompt, as the original)")

    gen = commands.add_parser("generate", help="generate a dialog from a script and voice clips")
    gen.add_argument("--model", required=True, help="model folder (original or -hf layout)")
    gen.add_argument("--script", required=True, help="text file with 'Speaker N: text' lines")
    gen.add_argument("--voice", action="append", type=_parse_voice, default=[], required=True, help="N=clip.wav, once per speaker")
    gen.add_argument("--out", required=True, help="output WAV path")
    gen.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    add_sampling(gen, None)
    add_placement(gen, "cuda" if torch.cuda.is_available() else "cpu")
    gen.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="write a small synthetic checkpoint and generate a two-speaker dialog from it")
    demo.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the synthetic checkpoint and the WAV go")
    demo.add_argument("--out", default=None, help="output WAV (default: <cache>/demo.wav)")
    add_sampling(demo, 4.0)
    add_placement(demo, "cpu")  # the synthetic model is fp32 and tiny: the CPU is enough
    demo.set_defaults(func=cmd_demo)

    from .bench_case import add_bench_command
    from .planner import add_table_command

    add_table_command(commands)
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VibeVoiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

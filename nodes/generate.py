"""Generate Dialog: a script and up to four voice clips -> 24 kHz speech (AUDIO) and run statistics."""

from __future__ import annotations

import time

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..vibevoice_offload.frame_loop import GenerationSettings
from ..vibevoice_offload.prompt import parse_script
from .shared import CATEGORY, VibeVoiceModelType

SPEAKERS = 4
DEFAULT_SCRIPT = "Speaker 1: Welcome back to the show. Today we talk about small GPUs.\nSpeaker 2: And how to run a seven billion parameter voice model on one."
PROGRESS_TEXT_EVERY_S = 1.0


def _send_text(text: str, node_id) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):  # not running inside ComfyUI's server
        pass


def format_stats(s: dict) -> str:
    gb = 1e9
    lines = [
        f"{s['model']} ({s['dtype']}) on {s['device']}",
        f"{s['audio_seconds']:.2f} s of audio in {s['total_s']:.2f} s (RTF {s['rtf']:.2f}); "
        f"{s['frames']} frames, {s['ms_per_frame']:.1f} ms per frame, prefill {s['prefill_ms']:.0f} ms; stopped: {s['stopped']}",
        f"decoder layers resident {s['resident_layers']}/{s['num_layers']} ({s['offload']}); "
        f"weights on device {s['weights_on_device_bytes'] / gb:.3f} GB, run estimate {s['run_memory_estimate_bytes'] / gb:.3f} GB",
        f"load {s['load_s']:.2f} s ({'already loaded' if s['was_loaded'] else 'loaded for this run'})",
    ]
    if "peak_vram_bytes" in s:
        lines.append(f"peak VRAM {s['peak_vram_bytes'] / gb:.3f} GB allocated, {s['peak_vram_reserved_bytes'] / gb:.3f} GB reserved")
    engine = s.get("engine")
    if isinstance(engine, dict) and engine.get("offload_streamed_layers"):
        line = (
            f"streamed {engine['offload_streamed_layers']} layers: {engine.get('offload_bytes_streamed', 0) / gb:.3f} GB "
            f"in {engine.get('offload_copies', 0)} copies ({'pinned' if engine.get('offload_pinned') else 'pageable'})"
        )
        if engine.get("offload_link_gbps"):
            line += f", link {engine['offload_link_gbps']:.1f} GB/s, compute waited {engine.get('offload_wait_ms', 0.0):.1f} ms"
        lines.append(line)
    return "\n".join(lines)


def voices_for(script: str, clips: list) -> dict:
    """Script speaker numbers -> AUDIO clips: 'Speaker 1' takes speaker_1; a script that
    counts from 0 ('Speaker 0') takes speaker_1 for 0."""
    speakers = sorted({line.speaker for line in parse_script(script)})
    shift = 1 if 0 in speakers else 0
    voices = {}
    for speaker in speakers:
        index = speaker + shift
        clip = clips[index - 1] if 1 <= index <= SPEAKERS else None
        if clip is not None:
            voices[speaker] = (clip["waveform"], int(clip["sample_rate"]))
    return voices


class VibeVoiceGenerateDialog(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VibeVoiceGenerateDialog",
            display_name="Generate Dialog",
            category=CATEGORY,
            description="Speaks a dialog script with the voices of up to four reference clips. Progress per frame; Cancel stops it at once (no partial audio).",
            inputs=[
                VibeVoiceModelType.Input("model", tooltip="From Load VibeVoice (Offloaded)."),
                io.String.Input("script", multiline=True, default=DEFAULT_SCRIPT, tooltip="One line per utterance: 'Speaker 1: text' (or '[1]: text'). Speakers 1 to 4 take the voices of speaker_1 .. speaker_4."),
                *[
                    io.Audio.Input(f"speaker_{i}", optional=True, tooltip=f"Reference voice for 'Speaker {i}' (any length and sample rate; 5-30 s of clean speech works best). Needed only if the script has Speaker {i}.")
                    for i in range(1, SPEAKERS + 1)
                ],
                io.Float.Input("cfg", default=1.3, min=1.0, max=10.0, step=0.05, tooltip="Classifier-free guidance of the diffusion head. 1.3 is the model's default; 1.0 skips the negative branch (faster, less stable)."),
                io.Int.Input("steps", default=10, min=1, max=100, tooltip="Diffusion steps per speech frame. 10 is the usual choice; more is slower and rarely better."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Random seed of the voice-prompt noise and the diffusion sampling: the same seed and inputs give the same audio."),
                io.Float.Input("max_seconds", default=300.0, min=0.0, max=7200.0, step=0.01, tooltip="Upper limit on generated audio in seconds (the model usually stops earlier by itself). 0: as many frames as the prompt has tokens. Longer limits reserve more VRAM for the KV cache."),
            ],
            outputs=[
                io.Audio.Output("audio", display_name="audio", tooltip="24 kHz mono speech."),
                io.String.Output("stats", display_name="stats", tooltip="Run statistics: speed, real-time factor, layers resident and streamed, VRAM used."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, script, cfg, steps, seed, max_seconds, speaker_1=None, speaker_2=None, speaker_3=None, speaker_4=None) -> io.NodeOutput:
        node_id = cls.hidden.unique_id
        voices = voices_for(script, [speaker_1, speaker_2, speaker_3, speaker_4])
        settings = GenerationSettings(cfg=cfg, steps=steps, seed=seed, max_seconds=max_seconds or None)
        progress = comfy.utils.ProgressBar(1, node_id=node_id)
        last_text = [time.monotonic()]

        def on_frame(frame: int, total: int, chunk) -> None:
            # The progress hook raises InterruptProcessingException on Cancel: let it propagate.
            progress.update_absolute(frame, total)
            comfy.model_management.throw_exception_if_processing_interrupted()
            if time.monotonic() - last_text[0] >= PROGRESS_TEXT_EVERY_S:
                last_text[0] = time.monotonic()
                _send_text(f"frame {frame}/{total}", node_id)

        result, stats = model.patcher.generate(model.offload, script, voices, settings, on_frame)
        if result.waveform.numel() == 0:
            raise RuntimeError(f"VibeVoice produced no speech frames ({stats['tokens']} tokens, stopped: {stats['stopped']}); try another seed or a longer script line")
        text = format_stats(stats)
        _send_text(text, node_id)
        audio = {"waveform": result.waveform.reshape(1, 1, -1), "sample_rate": result.sample_rate}
        return io.NodeOutput(audio, text, ui={"vibevoice_stats": [stats]})

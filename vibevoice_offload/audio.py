"""Voice clips: any sample rate, channel count and length -> 24 kHz mono at -25 dBFS."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.signal import resample_poly

from .config import SAMPLE_RATE
from .errors import ScriptError

TARGET_DBFS = -25.0
_EPS = 1e-6


def prepare_voice(waveform: torch.Tensor | np.ndarray, sample_rate: int, *, speaker: str, hop: int) -> np.ndarray:
    """Validate, downmix, resample to 24 kHz and normalise one reference clip (float32, 1-D).

    `waveform` is [samples], [channels, samples] or ComfyUI's [batch, channels, samples]."""
    audio = waveform.detach().cpu().float().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform, dtype=np.float32)
    if audio.ndim == 3:
        audio = audio[0]
    if audio.ndim == 2:
        audio = audio.mean(axis=0)
    if audio.ndim != 1 or audio.size == 0:
        raise ScriptError(f"voice clip for {speaker} is empty or has an unexpected shape {tuple(np.shape(waveform))}")
    if not np.isfinite(audio).all():
        raise ScriptError(f"voice clip for {speaker} contains NaN or infinite samples")
    if sample_rate <= 0:
        raise ScriptError(f"voice clip for {speaker} has an invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE:
        divisor = math.gcd(int(sample_rate), SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // divisor, int(sample_rate) // divisor).astype(np.float32)
    if audio.size < hop:
        raise ScriptError(
            f"voice clip for {speaker} is too short: {audio.size / SAMPLE_RATE * 1000:.1f} ms after resampling, "
            f"at least one frame ({hop / SAMPLE_RATE * 1000:.1f} ms) is needed"
        )
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    if rms < 1e-5:
        raise ScriptError(f"voice clip for {speaker} is silent (RMS {rms:.2e})")
    # The original processor's normalisation: scale to the target RMS, then avoid clipping.
    audio = audio * (10 ** (TARGET_DBFS / 20) / (rms + _EPS))
    peak = float(np.abs(audio).max())
    if peak > 1.0:
        audio = audio / (peak + _EPS)
    return audio.astype(np.float32)

"""Dialog scripts -> the exact VibeVoice prompt (token ids and padded voice clips)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, VibeVoiceConfig

from .audio import prepare_voice
from .config import hop_length
from .errors import ScriptError

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each "
    "respective speaker.\n"
)
_LINE = re.compile(r"^(?:Speaker\s+(\d+)\s*:|\[(\d+)\]\s*:)\s*(.*)$", re.IGNORECASE)
MAX_SPEAKERS = 4


@dataclass(frozen=True)
class ScriptLine:
    speaker: int  # as written in the script
    text: str


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [1, length]
    voice_values: torch.Tensor  # [speakers, 1, padded samples], zero padded to a multiple of the hop
    voice_mask: torch.Tensor  # [speakers, padded samples] bool, True on real samples
    speakers: list[int]  # script speaker numbers, in prompt order

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def parse_script(script: str) -> list[ScriptLine]:
    """`Speaker N: text` or `[N]: text` lines; blank lines ignored; anything else is an error naming the line."""
    lines: list[ScriptLine] = []
    for number, raw in enumerate(script.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped:
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise ScriptError(f"script line {number} is not 'Speaker N: text' or '[N]: text': {stripped[:60]!r}")
        speaker = int(match.group(1) or match.group(2))
        text = match.group(3).strip()
        if not text:
            raise ScriptError(f"script line {number} (speaker {speaker}) has no text")
        lines.append(ScriptLine(speaker, text))
    if not lines:
        raise ScriptError("the script is empty: write at least one 'Speaker 1: text' line")
    speakers = sorted({line.speaker for line in lines})
    if len(speakers) > MAX_SPEAKERS:
        raise ScriptError(f"the script has {len(speakers)} speakers ({speakers}); VibeVoice supports 1 to {MAX_SPEAKERS}")
    return lines


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    config: VibeVoiceConfig,
    script: str,
    voices: Mapping[int, tuple[torch.Tensor | np.ndarray, int]],
) -> Prompt:
    """The prompt of VIBEVOICE.md: system line, one voice block per speaker, the script, then speech start.

    `voices` maps the script's speaker numbers to (waveform, sample rate)."""
    lines = parse_script(script)
    speakers = sorted({line.speaker for line in lines})
    missing = [s for s in speakers if s not in voices or voices[s] is None]
    if missing:
        raise ScriptError(f"no voice clip for speaker(s) {', '.join(map(str, missing))}: connect one per speaker in the script")
    # Speaker ids are shifted to start at 0 when none is 0, as the original processor does.
    offset = 0 if 0 in speakers else min(speakers)
    hop = hop_length(config)
    clips = [prepare_voice(*voices[s], speaker=f"speaker {s}", hop=hop) for s in speakers]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    ids = encode(SYSTEM_PROMPT) + encode(" Voice input:\n")
    for speaker, clip in zip(speakers, clips):
        frames = math.ceil(clip.size / hop)
        ids += encode(f" Speaker {speaker - offset}:")
        ids += [config.audio_bos_token_id] + [config.audio_token_id] * frames + [config.audio_eos_token_id]
        ids += encode("\n")
    ids += encode(" Text input:\n")
    for line in lines:
        ids += encode(f" Speaker {line.speaker - offset}: {line.text}\n")
    ids += encode(" Speech output:\n") + [config.audio_bos_token_id]

    padded = math.ceil(max(c.size for c in clips) / hop) * hop
    values = torch.zeros(len(clips), 1, padded)
    mask = torch.zeros(len(clips), padded, dtype=torch.bool)
    for row, clip in enumerate(clips):
        values[row, 0, : clip.size] = torch.from_numpy(clip)
        mask[row, : clip.size] = True
    return Prompt(torch.tensor([ids], dtype=torch.long), values, mask, speakers)

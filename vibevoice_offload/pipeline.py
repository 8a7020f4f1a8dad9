"""The library's front door: load a model folder, turn a script and voices into a waveform."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .checkpoint import LoadedCheckpoint, load_checkpoint, model_folder
from .executor import Executor, ResidentExecutor
from .frame_loop import FrameCallback, FrameLoop, GenerationResult, GenerationSettings
from .prompt import Prompt, build_prompt
from .tokenizer import load_tokenizer

Voice = tuple[torch.Tensor | np.ndarray, int]  # (waveform, sample rate)


@dataclass
class VibeVoice:
    checkpoint: LoadedCheckpoint
    tokenizer: PreTrainedTokenizerBase
    model_dir: Path

    @classmethod
    def load(cls, model_dir: Path | str, dtype: str = "bf16", tokenizer_fallbacks: Sequence[Path | str] = ()) -> "VibeVoice":
        model_dir = model_folder(model_dir)  # first: the tokenizer search would report a missing folder as a missing tokenizer
        tokenizer = load_tokenizer(model_dir, tokenizer_fallbacks)
        return cls(load_checkpoint(model_dir, dtype), tokenizer, model_dir)

    @property
    def model(self):  # noqa: ANN201 - transformers' VibeVoiceForConditionalGeneration
        return self.checkpoint.model

    def generate(
        self,
        script: str,
        voices: Mapping[int, Voice],
        settings: GenerationSettings = GenerationSettings(),
        *,
        executor: Executor | None = None,
        on_frame: FrameCallback | None = None,
    ) -> GenerationResult:
        """Generate a dialog. `voices` maps script speaker numbers to clips; `executor` places the
        weights (default: run the model where it is)."""
        return self.run(self.prompt(script, voices), settings, executor=executor, on_frame=on_frame)

    def prompt(self, script: str, voices: Mapping[int, Voice]) -> Prompt:
        """The prompt alone: its length and voice clips size the offload plan before a run."""
        return build_prompt(self.tokenizer, self.checkpoint.config, script, voices)

    def run(
        self,
        prompt: Prompt,
        settings: GenerationSettings = GenerationSettings(),
        *,
        executor: Executor | None = None,
        on_frame: FrameCallback | None = None,
    ) -> GenerationResult:
        loop = FrameLoop(self.model, executor or ResidentExecutor(self.model))
        return loop.run(prompt, settings, on_frame)

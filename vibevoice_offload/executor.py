"""Where the frame loop's modules run: the seam between the loop and the layer offloader.

The frame loop never moves weights itself. It asks an `Executor` for decoder layer i
right before computing it and reports when its work for that layer has been enqueued;
an offloading executor uses those two calls to stream layers through GPU slots, the
resident executor below just hands out the model's own layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from transformers import VibeVoiceForConditionalGeneration


class Executor(Protocol):
    """What the frame loop needs from whoever places the model's weights."""

    @property
    def device(self) -> torch.device:
        """Where activations, KV caches and the per-frame modules live."""

    def decoder_layer(self, index: int) -> nn.Module:
        """Decoder layer `index`, callable now (its weights are, or will be in stream order, on `device`)."""

    def decoder_layer_done(self, index: int) -> None:
        """All work using layer `index` for this pass has been enqueued; its weights may be recycled after it runs."""

    def acoustic_encoder(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The acoustic encoder on `device`, needed only while voice prompts are encoded."""

    @property
    def capturable(self) -> bool:
        """Whether the layers it hands out may be replayed from CUDA graphs: their weights
        move only by work the executor orders outside the layers' forward calls (module
        hooks, as the benchmark's peers use, would not run on replay)."""

    def begin_run(self) -> None:
        """A run starts (after its voice prompts are encoded): place what it needs, reset statistics."""

    def begin_frames(self) -> None:
        """The prompt pass is enqueued and the voice encoder's memory is free until `end_run`:
        an executor may spend it on the frames."""

    def end_run(self) -> None:
        """The run is over (finished, stopped or failed): give back what `begin_frames` took."""


class ResidentExecutor:
    """Runs the model where it already is (CPU tests, or a model fully moved to one GPU)."""

    def __init__(self, model: VibeVoiceForConditionalGeneration) -> None:
        self.model = model
        self._device = model.model.language_model.norm.weight.device

    @property
    def device(self) -> torch.device:
        return self._device

    def decoder_layer(self, index: int) -> nn.Module:
        return self.model.model.language_model.layers[index]

    def decoder_layer_done(self, index: int) -> None:
        pass

    @contextlib.contextmanager
    def acoustic_encoder(self) -> Iterator[nn.Module]:
        yield self.model.model.audio_tower.encoder

    @property
    def capturable(self) -> bool:
        return True

    def begin_run(self) -> None:
        pass

    def begin_frames(self) -> None:
        pass

    def end_run(self) -> None:
        pass

"""Tensor names: Microsoft's original checkpoint layout <-> transformers' VibeVoice modules.

One declarative table serves both directions: loading converts original names to
transformers names, and the synthetic-checkpoint writer converts back, so the two can
never disagree. Each rule rewrites a key prefix; `{i}` is a layer index that is one
higher in the original layout (its index 0 is the transformers "stem").
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _PrefixRule:
    original: str
    hf: str
    shift: int = 1  # original index = transformers index + shift

    def _compile(self, template: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))

    def rewrite(self, key: str, *, to_hf: bool) -> str | None:
        source, target, shift = (self.original, self.hf, -self.shift) if to_hf else (self.hf, self.original, self.shift)
        match = self._compile(source).match(key)
        if match is None:
            return None
        index = match.groupdict().get("i")
        if index is not None and int(index) + shift < 0:
            return None
        prefix = target.replace("{i}", str(int(index) + shift)) if index is not None else target
        return prefix + key[match.end():]


def _encoder_rules(original: str, hf: str) -> list[_PrefixRule]:
    return [
        _PrefixRule(f"{original}.downsample_layers.0.0.conv.conv.", f"{hf}.stem.conv.conv."),
        _PrefixRule(f"{original}.stages.0.", f"{hf}.stem.stage."),
        _PrefixRule(f"{original}.downsample_layers.{{i}}.0.conv.conv.", f"{hf}.conv_layers.{{i}}.conv.conv."),
        _PrefixRule(f"{original}.stages.{{i}}.", f"{hf}.conv_layers.{{i}}.stage."),
        _PrefixRule(f"{original}.head.conv.conv.", f"{hf}.head.conv."),
    ]


_DECODER = ("model.acoustic_tokenizer.decoder", "model.audio_tower.decoder")

_RULES: list[_PrefixRule] = [
    *_encoder_rules("model.acoustic_tokenizer.encoder", "model.audio_tower.encoder"),
    *_encoder_rules("model.semantic_tokenizer.encoder", "model.semantic_tokenizer_encoder"),
    _PrefixRule(f"{_DECODER[0]}.upsample_layers.0.0.conv.conv.", f"{_DECODER[1]}.stem.conv.conv."),
    _PrefixRule(f"{_DECODER[0]}.stages.0.", f"{_DECODER[1]}.stem.stage."),
    _PrefixRule(f"{_DECODER[0]}.upsample_layers.{{i}}.0.convtr.convtr.", f"{_DECODER[1]}.conv_layers.{{i}}.convtr.convtr."),
    _PrefixRule(f"{_DECODER[0]}.stages.{{i}}.", f"{_DECODER[1]}.conv_layers.{{i}}.stage."),
    _PrefixRule(f"{_DECODER[0]}.head.conv.conv.", f"{_DECODER[1]}.head.conv."),
    _PrefixRule("model.prediction_head.t_embedder.mlp.0.", "model.diffusion_head.timestep_proj.fc1."),
    _PrefixRule("model.prediction_head.t_embedder.mlp.2.", "model.diffusion_head.timestep_proj.fc2."),
    _PrefixRule("model.prediction_head.layers.{i}.adaLN_modulation.1.", "model.diffusion_head.layers.{i}.linear.", shift=0),
    _PrefixRule("model.prediction_head.final_layer.adaLN_modulation.1.", "model.diffusion_head.final_layer.linear_1."),
    _PrefixRule("model.prediction_head.final_layer.linear.", "model.diffusion_head.final_layer.linear_2."),
    _PrefixRule("model.prediction_head.", "model.diffusion_head."),
    _PrefixRule("model.acoustic_connector.fc1.", "model.multi_modal_projector.linear_1."),
    _PrefixRule("model.acoustic_connector.norm.", "model.multi_modal_projector.act."),
    _PrefixRule("model.acoustic_connector.fc2.", "model.multi_modal_projector.linear_2."),
    _PrefixRule("model.semantic_connector.fc1.", "model.semantic_connector.linear_1."),
    _PrefixRule("model.semantic_connector.norm.", "model.semantic_connector.act."),
    _PrefixRule("model.semantic_connector.fc2.", "model.semantic_connector.linear_2."),
    _PrefixRule("model.speech_scaling_factor", "model.latent_scaling_factor"),
    _PrefixRule("model.speech_bias_factor", "model.latent_bias_factor"),
]

# Inside every tokenizer block the depthwise conv drops two wrapper levels.
_INFIXES: list[tuple[str, str]] = [(".mixer.conv.conv.conv.", ".mixer.conv.")]


def _convert(key: str, *, to_hf: bool) -> str:
    for rule in _RULES:
        converted = rule.rewrite(key, to_hf=to_hf)
        if converted is not None:
            key = converted
            break
    for original, hf in _INFIXES:
        key = key.replace(original, hf) if to_hf else key.replace(hf, original)
    return key


def original_to_hf(key: str) -> str:
    """Original checkpoint tensor name -> transformers `VibeVoiceForConditionalGeneration` name."""
    return _convert(key, to_hf=True)


def hf_to_original(key: str) -> str:
    """transformers tensor name -> original checkpoint tensor name (for writing test checkpoints)."""
    return _convert(key, to_hf=False)

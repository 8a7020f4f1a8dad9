"""Model-folder layout detection and explicit config conversion.

Microsoft's original `config.json` (with `decoder_config`, `*_tokenizer_config` and
`diffusion_head_config`) is silently misread by `VibeVoiceConfig` (it builds a default
4096-wide Qwen2), so it is converted field by field here. Converted "-hf" folders are
passed to transformers as they are.
"""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any

from transformers import VibeVoiceConfig

from .errors import CheckpointError

# The four token ids the decoder may emit; the same in both released checkpoints and in
# ComfyUI's bundled Qwen2.5 tokenizer.
SPEECH_START_ID = 151652
SPEECH_END_ID = 151653
SPEECH_FRAME_ID = 151654
END_ID = 151643

# The original tokenizer config stores the VAE's fixed std before the 0.8 rescale that the
# original sampling applied; transformers stores the rescaled value (0.5 / 0.8 = 0.625).
_FIX_STD_TO_VAE_STD = 1 / 0.8


class Layout(enum.Enum):
    ORIGINAL = "original"  # Microsoft's release: microsoft/VibeVoice-1.5B, VibeVoice-Large
    HF = "hf"  # transformers' converted layout: VibeVoice-1.5B-hf


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json; a VibeVoice model folder needs one")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def detect_layout(raw: dict[str, Any], source: Path | str = "config.json") -> Layout:
    if "decoder_config" in raw and "acoustic_tokenizer_config" in raw:
        return Layout.ORIGINAL
    if "text_config" in raw and "audio_config" in raw:
        return Layout.HF
    raise CheckpointError(
        f"{source}: unknown model layout: expected Microsoft's original VibeVoice config "
        "(decoder_config, acoustic_tokenizer_config, ...) or a transformers -hf config "
        f"(text_config, audio_config, ...); found keys {sorted(raw)}"
    )


def _tokenizer_config(raw: dict[str, Any], *, sampled: bool) -> dict[str, Any]:
    depths = raw["encoder_depths"]
    if isinstance(depths, str):
        depths = [int(d) for d in depths.split("-")]
    converted = {
        "channels": raw.get("channels", 1),
        "hidden_size": raw["vae_dim"],
        "num_filters": raw["encoder_n_filters"],
        # The original lists the ratios decoder-first; transformers lists them encoder-first.
        "downsampling_ratios": list(reversed(raw["encoder_ratios"])),
        "depths": list(depths),
        "rms_norm_eps": raw.get("layernorm_eps", 1e-5),
        "layer_scale_init_value": raw.get("layer_scale_init_value", 1e-6),
    }
    for optional in ("kernel_size", "ffn_expansion"):
        if optional in raw:
            converted[optional] = raw[optional]
    if sampled:
        converted["vae_std"] = raw.get("fix_std", 0.5) * _FIX_STD_TO_VAE_STD
    else:
        converted["model_type"] = "vibevoice_acoustic_tokenizer_encoder"
    return converted


def convert_original_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Original `config.json` dict -> keyword arguments of `VibeVoiceConfig`."""
    text = dict(raw["decoder_config"])
    text.pop("torch_dtype", None)
    text["model_type"] = "qwen2"
    tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = tied
    head = raw["diffusion_head_config"]
    hidden = text["hidden_size"]
    diffusion = {
        "hidden_size": head.get("hidden_size", hidden),
        "latent_size": head.get("latent_size", head.get("speech_vae_dim")),
        "num_hidden_layers": head["head_layers"],
        "intermediate_size": int(head["head_ffn_ratio"] * head.get("hidden_size", hidden)),
        "rms_norm_eps": head.get("rms_norm_eps", 1e-5),
    }
    if "frequency_embedding_size" in head:
        diffusion["frequency_embedding_size"] = head["frequency_embedding_size"]
    converted = {
        "audio_config": _tokenizer_config(raw["acoustic_tokenizer_config"], sampled=True),
        "semantic_model_config": _tokenizer_config(raw["semantic_tokenizer_config"], sampled=False),
        "text_config": text,
        "diffusion_head_config": diffusion,
        "tie_word_embeddings": tied,
    }
    for key in ("audio_bos_token_id", "audio_eos_token_id", "audio_token_id", "eos_token_id", "pad_token_id"):
        if key in raw:
            converted[key] = raw[key]
    return converted


def build_config(raw: dict[str, Any], layout: Layout, source: Path | str = "config.json") -> VibeVoiceConfig:
    try:
        if layout is Layout.ORIGINAL:
            kwargs = convert_original_config(raw)
        else:
            kwargs = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "torch_dtype", "dtype", "model_type")}
            head = dict(kwargs.get("diffusion_head_config") or {})
            # transformers 5.17 does not copy these into the head config itself.
            head.setdefault("hidden_size", kwargs["text_config"]["hidden_size"])
            head.setdefault("latent_size", kwargs["audio_config"]["hidden_size"])
            kwargs["diffusion_head_config"] = head
        config = VibeVoiceConfig(**kwargs)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot convert the {layout.value} config: {exc!r}") from exc
    return config


def load_config(model_dir: Path | str) -> tuple[VibeVoiceConfig, Layout]:
    model_dir = Path(model_dir)
    raw = read_config_json(model_dir)
    layout = detect_layout(raw, model_dir / "config.json")
    return build_config(raw, layout, model_dir / "config.json"), layout


def hop_length(config: VibeVoiceConfig) -> int:
    """Samples per speech frame (3200 for the released models: 7.5 frames per second)."""
    return int(math.prod(config.audio_config.downsampling_ratios))


SAMPLE_RATE = 24_000

"""Synthetic VibeVoice checkpoints: real tensor names and layouts, scaled-down shapes.

No real weights can be downloaded, so the demo and the tests write their own. Random
weights never choose to speak; `make_speaking` edits them so the speech-frame token
always wins: one hidden channel carries a constant that no decoder layer writes to, and
the frame row of `lm_head` reads it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import VibeVoiceForConditionalGeneration

from .config import END_ID, SPEECH_END_ID, SPEECH_FRAME_ID, SPEECH_START_ID, Layout, build_config
from .names import hf_to_original

# The real Qwen2.5 vocabulary size, so the real special-token ids (and ComfyUI's bundled
# tokenizer) work with synthetic models.
VOCAB_SIZE = 151936


def original_config(
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ratios: tuple[int, ...] = (2, 2),
    depths: str = "1-1-1",
    filters: int = 4,
    acoustic_dim: int = 8,
    semantic_dim: int = 12,
    head_layers: int = 2,
    vocab_size: int = VOCAB_SIZE,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A config.json in Microsoft's original layout (the same keys as the released ones).

    `ratios` are listed encoder-first (their product is the hop length in samples)."""

    def tokenizer(dim: int, fix_std: float, model_type: str) -> dict[str, Any]:
        return {
            "causal": True, "channels": 1, "conv_bias": True, "conv_norm": "none", "corpus_normalize": 0.0,
            "disable_last_norm": True, "encoder_depths": depths, "encoder_n_filters": filters,
            "encoder_ratios": list(reversed(ratios)), "fix_std": fix_std, "layer_scale_init_value": 1e-6,
            "layernorm": "RMSNorm", "layernorm_elementwise_affine": True, "layernorm_eps": 1e-5,
            "mixer_layer": "depthwise_conv", "model_type": model_type, "pad_mode": "constant",
            "std_dist_type": "gaussian" if fix_std else "none", "vae_dim": dim, "weight_init_value": 0.01,
        }

    acoustic = tokenizer(acoustic_dim, 0.5, "vibevoice_acoustic_tokenizer")
    acoustic.update(decoder_depths=None, decoder_n_filters=filters, decoder_ratios=list(reversed(ratios)))
    return {
        "acoustic_vae_dim": acoustic_dim,
        "acoustic_tokenizer_config": acoustic,
        "architectures": ["VibeVoiceForConditionalGeneration"],
        "decoder_config": {
            "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
            "intermediate_size": intermediate_size, "max_position_embeddings": 8192, "max_window_layers": layers,
            "model_type": "qwen2", "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0,
            "sliding_window": None, "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "bfloat16",
            "use_cache": True, "use_sliding_window": False, "vocab_size": vocab_size,
        },
        "diffusion_head_config": {
            "ddpm_batch_mul": 4, "ddpm_beta_schedule": "cosine", "ddpm_num_inference_steps": 20, "ddpm_num_steps": 1000,
            "diffusion_type": "ddpm", "head_ffn_ratio": 3.0, "head_layers": head_layers, "hidden_size": hidden_size,
            "latent_size": acoustic_dim, "model_type": "vibevoice_diffusion_head", "prediction_type": "v_prediction",
            "rms_norm_eps": 1e-5, "speech_vae_dim": acoustic_dim,
        },
        "model_type": "vibevoice",
        "semantic_tokenizer_config": tokenizer(semantic_dim, 0, "vibevoice_semantic_tokenizer"),
        "semantic_vae_dim": semantic_dim,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
    }


def random_model(raw_config: dict[str, Any], seed: int = 0, std: float = 0.2) -> VibeVoiceForConditionalGeneration:
    """transformers' model for an original-layout config dict, with seeded random weights (fp32)."""
    config = build_config(raw_config, Layout.ORIGINAL)
    generator = torch.Generator().manual_seed(seed)
    model = VibeVoiceForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("act.weight") or "gamma" in name:
                param.fill_(1.0)
            elif "scaling_factor" in name:
                param.fill_(1.0)
            elif "bias_factor" in name:
                param.fill_(0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def make_speaking(model: VibeVoiceForConditionalGeneration, carrier: float = 1.0, frame_logit: float = 4.0) -> None:
    """Edit weights so that the speech-frame token always wins among the four allowed ids.

    Hidden channel 0 carries `carrier` from every input embedding (token embeddings and both
    connectors); no attention or MLP output writes to it, so after the final norm it stays
    positive, and only the frame row of `lm_head` reads it."""
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight[:, 0] = carrier
        for projector in (model.model.multi_modal_projector, model.model.semantic_connector):
            projector.linear_2.weight[0, :] = 0.0
            projector.linear_2.bias[0] = carrier / 2
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        lm.norm.weight[0] = 1.0
        if model.lm_head.weight is lm.embed_tokens.weight:
            raise ValueError("make_speaking needs an untied lm_head (tie_word_embeddings=False)")
        model.lm_head.weight.zero_()
        model.lm_head.weight[SPEECH_FRAME_ID, 0] = frame_logit


def write_checkpoint(
    model: VibeVoiceForConditionalGeneration,
    raw_config: dict[str, Any],
    out_dir: Path | str,
    *,
    layout: Layout = Layout.ORIGINAL,
    shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write `model` as a model folder in the original or -hf layout, in `shards` safetensors files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    rename = hf_to_original if layout is Layout.ORIGINAL else (lambda key: key)
    tensors = {rename(k): v.detach().to(dtype).contiguous() for k, v in state.items()}
    if layout is Layout.ORIGINAL:
        config_json = raw_config
    else:
        config_json = model.config.to_dict()
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2, default=str))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index::shards]
        save_file({k: tensors[k] for k in part}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out_dir


def write_tokenizer(out_dir: Path | str) -> Path:
    """A small character-level tokenizer with Qwen2.5's special tokens at their real ids.

    Stands in for the Qwen2.5 tokenizer (not shipped with checkpoints) where none is on disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(string.printable)}
    vocab["<unk>"] = len(vocab)
    specials = {"<|endoftext|>": END_ID, "<|vision_start|>": SPEECH_START_ID, "<|vision_end|>": SPEECH_END_ID, "<|vision_pad|>": SPEECH_FRAME_ID}
    vocab.update(specials)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join without separators
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "model_max_length": 32768, "add_prefix_space": False,
    }, indent=2))
    return out_dir


# The released tokenizers' hop (3200 samples: 7.5 frames per second) with tiny layers: the
# demos' audio has real-time frame lengths.
REAL_HOP_SHAPE: dict[str, Any] = {"ratios": (2, 2, 4, 5, 5, 8), "filters": 4, "depths": "1-1-1-1-1-1-1"}


def write_demo_checkpoint(out_dir: Path | str, *, layout: Layout = Layout.ORIGINAL, seed: int = 0, **config_overrides: Any) -> Path:
    """A small speaking model in the given layout, with a tokenizer, ready to generate from."""
    raw = original_config(**config_overrides)
    model = random_model(raw, seed=seed)
    make_speaking(model)
    write_checkpoint(model, raw, out_dir, layout=layout)
    write_tokenizer(out_dir)
    return Path(out_dir)

"""Config conversion and tensor names, checked against the real released checkpoints' lists."""

import json
from pathlib import Path

import pytest
import torch
from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

from vibevoice_offload.config import Layout, detect_layout, load_config, read_config_json
from vibevoice_offload.errors import CheckpointError
from vibevoice_offload.names import hf_to_original, original_to_hf

# Copies of ../shared/reference/checkpoints: the released configs and every tensor name and shape.
REFERENCE = Path(__file__).resolve().parent / "data"
MODELS = ["VibeVoice-1.5B", "VibeVoice-Large"]


def reference_dir(name: str) -> Path:
    return REFERENCE / name


@pytest.mark.parametrize("name", MODELS)
def test_every_released_tensor_maps_to_a_transformers_weight_of_the_same_shape(name):
    folder = reference_dir(name)
    config, layout = load_config(folder)
    assert layout is Layout.ORIGINAL
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = json.loads((folder / "tensors.json").read_text())["tensors"]
    converted = {original_to_hf(k): tuple(shape) for k, shape in released.items()}
    missing = set(expected) - set(converted)
    if config.tie_word_embeddings:
        assert missing == {"lm_head.weight"}  # 1.5B stores only embed_tokens
    else:
        assert missing == set()
    assert set(converted) - set(expected) == set()
    assert {k: v for k, v in converted.items() if expected[k] != v} == {}
    assert all(hf_to_original(original_to_hf(k)) == k for k in released)


@pytest.mark.parametrize("name,hidden,intermediate,params", [("VibeVoice-1.5B", 1536, 4608, 2.704e9), ("VibeVoice-Large", 3584, 10752, 9.343e9)])
def test_original_config_is_converted_field_by_field(name, hidden, intermediate, params):
    config, _ = load_config(reference_dir(name))
    assert config.text_config.hidden_size == hidden
    assert config.text_config.num_hidden_layers == 28
    assert config.diffusion_head_config.intermediate_size == intermediate
    assert config.diffusion_head_config.num_hidden_layers == 4
    assert list(config.audio_config.downsampling_ratios) == [2, 2, 4, 5, 5, 8]
    assert list(config.audio_config.depths) == [3, 3, 3, 3, 3, 3, 8]
    assert config.audio_config.vae_std == pytest.approx(0.625)
    assert config.semantic_model_config.hidden_size == 128
    assert config.audio_config.hidden_size == 64
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)


def test_the_original_config_is_misread_when_passed_as_is():
    """Why the conversion exists: VibeVoiceConfig silently ignores decoder_config."""
    raw = read_config_json(reference_dir("VibeVoice-Large"))
    naive = VibeVoiceConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    converted, _ = load_config(reference_dir("VibeVoice-Large"))
    assert naive.text_config.hidden_size != 3584
    assert converted.text_config.hidden_size == 3584


def test_unknown_layout_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"config.json: unknown model layout"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="unknown model layout"):
        detect_layout({"foo": 1})

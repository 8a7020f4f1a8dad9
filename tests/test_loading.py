"""Loading model folders: both layouts, shards, dtypes, fp8 storage, host memory, bad input."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vibevoice_offload.checkpoint import load_checkpoint
from vibevoice_offload.config import Layout
from vibevoice_offload.errors import CheckpointError
from vibevoice_offload.fp8 import Fp8Linear
from vibevoice_offload.frame_loop import GenerationSettings
from vibevoice_offload.pipeline import VibeVoice
from vibevoice_offload.synthetic import make_speaking, original_config, random_model, write_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def speaking():
    raw = original_config()
    model = random_model(raw, seed=3)
    make_speaking(model)
    return raw, model


def write(tmp_path: Path, speaking, **kwargs) -> Path:
    raw, model = speaking
    out = write_checkpoint(model, raw, tmp_path / "model", **kwargs)
    write_tokenizer(out)
    return out


def test_original_and_hf_layouts_give_identical_weights_and_waveforms(tmp_path, speaking, two_voices):
    original = VibeVoice.load(write(tmp_path / "a", speaking, layout=Layout.ORIGINAL), dtype="fp32")
    hf = VibeVoice.load(write(tmp_path / "b", speaking, layout=Layout.HF, shards=3), dtype="fp32")
    assert original.checkpoint.layout is Layout.ORIGINAL and hf.checkpoint.layout is Layout.HF
    a, b = original.model.state_dict(), hf.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    settings = GenerationSettings(seed=5, steps=3, max_frames=6)
    wave_a = original.generate("Speaker 1: Hi.\nSpeaker 2: Hello.", two_voices, settings).waveform
    wave_b = hf.generate("Speaker 1: Hi.\nSpeaker 2: Hello.", two_voices, settings).waveform
    assert wave_a.numel() > 0 and torch.equal(wave_a, wave_b)


@pytest.mark.parametrize("layout,shards,dtype", [(Layout.ORIGINAL, 1, "bf16"), (Layout.HF, 3, "fp32")])
def test_a_decoder_layer_read_again_is_the_loaded_one(tmp_path, speaking, layout, shards, dtype):
    """`read_decoder_layer` (what an fp8-streaming engine reads back instead of keeping a
    rounded layer) gives the loaded layer's tensors, bit for bit, in either layout."""
    loaded = load_checkpoint(write(tmp_path, speaking, layout=layout, shards=shards), dtype)
    layers = loaded.model.model.language_model.layers
    for index in (0, len(layers) - 1):
        want = dict(layers[index].named_parameters())
        got = loaded.read_decoder_layer(index)
        assert got.keys() == want.keys()
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match="no tensors of decoder layer 99"):
        loaded.read_decoder_layer(99)


def test_an_fp8_load_is_not_read_again(tmp_path, speaking):
    with pytest.raises(CheckpointError, match="loaded with fp8 layers"):
        load_checkpoint(write(tmp_path, speaking), "fp8").read_decoder_layer(0)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_dtypes(tmp_path, speaking, dtype, expected):
    loaded = load_checkpoint(write(tmp_path, speaking), dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    assert not any(t.is_meta for t in (*loaded.model.parameters(), *loaded.model.buffers()))


def test_fp8_storage_of_decoder_linears_with_per_channel_scales(tmp_path, speaking):
    folder = write(tmp_path, speaking, dtype=torch.float32)
    fp8 = load_checkpoint(folder, "fp8").model
    ref = load_checkpoint(folder, "fp32").model
    layer, ref_layer = fp8.model.language_model.layers[0], ref.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, Fp8Linear) and layer.mlp.down_proj.weight_fp8.dtype == torch.float8_e4m3fn
    assert layer.mlp.down_proj.weight_scale.shape == (ref_layer.mlp.down_proj.out_features,)
    assert fp8.model.diffusion_head.cond_proj.weight.dtype == torch.bfloat16
    x = torch.randn(1, 5, 32)
    y_ref = ref_layer.mlp(x)
    y = layer.mlp(x.bfloat16()).float()
    # e4m3 keeps 3 mantissa bits: a few percent through an MLP of random weights.
    assert ((y - y_ref).norm() / y_ref.norm()) < 0.08


def test_shards_with_an_index_and_tied_embeddings(tmp_path):
    raw = original_config(tie_word_embeddings=True)
    model = random_model(raw)
    folder = write_checkpoint(model, raw, tmp_path / "tied", shards=2, dtype=torch.float32)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # as in the released 1.5B
    loaded = load_checkpoint(folder, "fp32").model
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.model.language_model.embed_tokens.weight)


# ---- bad input: one clear error naming the file or tensor ----------------------------------------
def test_missing_folder_config_and_weights(tmp_path, speaking):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="nope: model folder does not exist"):  # not "no tokenizer found"
        VibeVoice.load(tmp_path / "nope")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match="a-file: not a folder"):
        load_checkpoint(tmp_path / "a-file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(empty)
    folder = write(tmp_path, speaking)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(folder)


def test_pickle_checkpoints_are_refused(tmp_path, speaking):
    folder = write(tmp_path, speaking)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only"):
        load_checkpoint(folder)


def test_truncated_and_corrupt_files_name_the_file(tmp_path, speaking):
    folder = write(tmp_path, speaking)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or corrupt"):
        load_checkpoint(folder)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or corrupt"):
        load_checkpoint(folder)


def test_missing_and_misshapen_tensors_are_named(tmp_path, speaking):
    folder = write(tmp_path, speaking)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.prediction_head.layers.1.adaLN_modulation.1.weight"
    saved = tensors.pop(name)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*prediction_head\.layers\.1\.adaLN_modulation\.1\.weight"):
        load_checkpoint(folder)
    tensors[name] = saved[:, :-1].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"diffusion_head\.layers\.1\.linear\.weight' has shape"):
        load_checkpoint(folder)


def test_index_naming_a_missing_shard(tmp_path, speaking):
    folder = write(tmp_path, speaking, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(folder)


# ---- host memory --------------------------------------------------------------------------------
def test_peak_host_ram_while_loading_is_at_most_1_2x_the_model(tmp_path):
    """A ~330 MB checkpoint loads with a peak RSS increase of at most 1.2x its loaded bytes."""
    raw = original_config(hidden_size=512, intermediate_size=1536, layers=8, heads=8, kv_heads=2)
    folder = write_checkpoint(random_model(raw, std=0.02), raw, tmp_path / "big", shards=2)
    script = textwrap.dedent(
        f"""
        import sys, json
        import torch, transformers, safetensors  # imports are not the model's memory
        from vibevoice_offload.checkpoint import load_checkpoint
        def status_mb(field):
            return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) / 1024
        base = status_mb('VmRSS')
        loaded = load_checkpoint({str(folder)!r}, 'bf16')
        # Touch every page of every weight, so memory-mapped tensors count as resident too.
        for t in loaded.model.state_dict().values():
            t.reshape(-1)[::1024].float().sum()
        # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's before exec).
        peak = status_mb('VmHWM')
        print(json.dumps({{"base": base, "peak": peak, "model_mb": loaded.nbytes / 2**20}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["model_mb"] > 250
    assert numbers["peak"] - numbers["base"] <= 1.2 * numbers["model_mb"], numbers

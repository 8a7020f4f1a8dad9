"""Loading a VibeVoice model folder into transformers' modules with little host memory.

The model is built on the meta device and every tensor is assigned as it is read from
the safetensors files (which safetensors maps from disk), so host RAM never holds a
second full copy. Both layouts are accepted: Microsoft's original (names converted
through `names.original_to_hf`) and transformers' "-hf" layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

from .config import Layout, load_config
from .errors import CheckpointError
from .fp8 import Fp8Linear, fp8_linear_names, quantize_fp8
from .names import hf_to_original, original_to_hf

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# "fp8" loads everything in bf16 except the decoder layers' linear weights.
LOAD_DTYPES = (*DTYPES, "fp8")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedCheckpoint:
    model: VibeVoiceForConditionalGeneration
    config: VibeVoiceConfig
    layout: Layout
    dtype: torch.dtype  # compute dtype of every module
    fp8_layers: bool  # decoder-layer linear weights stored in fp8
    model_dir: Path

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _unique_tensors(self.model))

    def read_decoder_layer(self, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer `index`'s tensors read from the folder again, named as inside the
        layer ("self_attn.q_proj.weight") and converted as `load_checkpoint` converts them:
        the loaded weights, bit for bit. An fp8-streaming engine reads a layer it makes
        resident again here (`OffloadEngine(layer_source=...)`) instead of keeping it rounded."""
        if self.fp8_layers:
            raise CheckpointError("read_decoder_layer: this checkpoint was loaded with fp8 layers; its layers are not re-read")
        prefix = f"model.language_model.layers.{index}."
        to_hf = original_to_hf if self.layout is Layout.ORIGINAL else (lambda key: key)
        tensors: dict[str, torch.Tensor] = {}
        for _, key, tensor in _read_tensors(weight_files(self.model_dir), lambda key: to_hf(key).startswith(prefix)):
            tensors[to_hf(key).removeprefix(prefix)] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        if not tensors:
            raise CheckpointError(f"{self.model_dir}: no tensors of decoder layer {index} in the weights")
        return tensors


def _unique_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by an index, or every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from exc
        files = [model_dir / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are missing from {model_dir}: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir}: found {', '.join(pickles)}: pickle checkpoints are refused (they can run code when "
            "loaded); this pack loads safetensors only. Convert the weights to .safetensors."
        )
    raise CheckpointError(f"{model_dir}: no weights found (expected model.safetensors or shards with model.safetensors.index.json)")


def _read_tensors(files: list[Path], wanted: Callable[[str], bool] = lambda key: True) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as reader:
                for key in reader.keys():
                    if wanted(key):
                        yield path, key, reader.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc


def _build_on_meta(config: VibeVoiceConfig, fp8_layers: bool) -> VibeVoiceForConditionalGeneration:
    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
        if fp8_layers:
            for layer in model.model.language_model.layers:
                for name in fp8_linear_names(layer):
                    linear: nn.Linear = layer.get_submodule(name)
                    parent_name, _, child = name.rpartition(".")
                    replacement = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None)
                    setattr(layer.get_submodule(parent_name), child, replacement)
    return model.eval()


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"{source}: unexpected tensor {key!r}: the model has no such module") from None
    if isinstance(module, Fp8Linear) and attr == "weight":
        expected = module.weight_fp8.shape
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
        module.weight_fp8, module.weight_scale = quantize_fp8(tensor)
        return
    slot = module._parameters if attr in module._parameters else module._buffers if attr in module._buffers else None
    if slot is None or slot[attr] is None:
        raise CheckpointError(f"{source}: unexpected tensor {key!r}: the model has no such weight")
    if tuple(tensor.shape) != tuple(slot[attr].shape):
        raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(slot[attr].shape)}")
    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
    slot[attr] = nn.Parameter(value, requires_grad=False) if attr in module._parameters else value


def _materialise_computed_buffers(model: nn.Module) -> None:
    """Rebuild on the CPU the modules whose buffers are computed from the config, not stored
    (rotary inverse frequencies, the diffusion timestep frequencies)."""
    for name, module in list(model.named_modules()):
        own = [b for b in module._buffers.values() if b is not None and b.is_meta]
        if own and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, type(module)(module.config))


def model_folder(model_dir: Path | str) -> Path:
    """`model_dir` as a Path; a CheckpointError naming it when it is not an existing folder."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: model folder does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder (a model folder holds config.json and the weights)")
    return model_dir


def load_checkpoint(model_dir: Path | str, dtype: str = "bf16") -> LoadedCheckpoint:
    """Load a VibeVoice model folder (original or -hf layout) onto the CPU."""
    if dtype not in LOAD_DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(LOAD_DTYPES)}")
    model_dir = model_folder(model_dir)
    config, layout = load_config(model_dir)
    compute_dtype = DTYPES.get(dtype, torch.bfloat16)
    fp8_layers = dtype == "fp8"
    files = weight_files(model_dir)
    model = _build_on_meta(config, fp8_layers)
    to_hf = original_to_hf if layout is Layout.ORIGINAL else (lambda key: key)
    for path, key, tensor in _read_tensors(files):
        _assign(model, to_hf(key), tensor, compute_dtype, f"{path.name}")
        del tensor
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _materialise_computed_buffers(model)
    missing = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        if layout is Layout.ORIGINAL:
            missing = [hf_to_original(name) for name in missing]
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: missing tensor(s) in the weights: {listed}")
    log.info("loaded %s (%s layout, %s) from %d file(s)", model_dir.name, layout.value, dtype, len(files))
    return LoadedCheckpoint(
        model=model, config=config, layout=layout, dtype=compute_dtype, fp8_layers=fp8_layers, model_dir=model_dir,
    )

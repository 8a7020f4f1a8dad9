"""What the nodes share: the custom link types, the models folder and the tokenizer fallback."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

CATEGORY = "audio/VibeVoice"
FOLDER = "vibevoice"

VibeVoiceModelType = io.Custom("VIBEVOICE_MODEL")
OffloadConfigType = io.Custom("OFFLOAD_CONFIG")


def register_models_folder() -> None:
    """models/vibevoice as the default `vibevoice` folder, keeping extra_model_paths.yaml entries."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def list_model_folders() -> list[str]:
    """Model folders (with a config.json) in every `vibevoice` path, one level or two deep
    (`VibeVoice-1.5B` or `microsoft/VibeVoice-1.5B`), as "/"-separated names."""
    names: list[str] = []
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if not os.path.isdir(path) or entry.startswith("."):
                continue
            if _is_model_dir(path):
                names.append(entry)
                continue
            for sub in sorted(os.listdir(path)):
                if _is_model_dir(os.path.join(path, sub)):
                    names.append(f"{entry}/{sub}")
    return list(dict.fromkeys(names))


def resolve_model_folder(name: str) -> str:
    """The folder of a model name from `list_model_folders` (the first path that has it)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid VibeVoice model name {name!r}")
    roots = folder_paths.get_folder_paths(FOLDER)
    for root in roots:
        path = os.path.join(root, *parts)
        if _is_model_dir(path):
            return path
    raise FileNotFoundError(
        f"VibeVoice model folder {name!r} not found (with a config.json) in: {', '.join(roots)}"
    )


def tokenizer_fallbacks() -> list[str]:
    """ComfyUI's bundled Qwen2.5 tokenizer: used when a model folder ships none (offline)."""
    import comfy.model_management  # `comfy` is a namespace package: no __file__ of its own

    comfy_dir = os.path.dirname(os.path.abspath(comfy.model_management.__file__))
    return [os.path.join(comfy_dir, "text_encoders", "qwen25_tokenizer")]

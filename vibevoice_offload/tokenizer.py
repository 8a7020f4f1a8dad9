"""Finding the Qwen2.5 text tokenizer on local disk. No code path reaches the network."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Tokenizer

from .errors import TokenizerNotFoundError


def _is_tokenizer_dir(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def tokenizer_search_path(model_dir: Path | str, fallback_dirs: Sequence[Path | str] = ()) -> list[Path]:
    """Where a tokenizer is looked for, in order: the model folder, a `tokenizer/` folder
    beside the model folders, then the fallbacks (inside ComfyUI: its bundled Qwen2.5 tokenizer)."""
    model_dir = Path(model_dir)
    return [model_dir, model_dir.parent / "tokenizer", *(Path(p) for p in fallback_dirs)]


def find_tokenizer_dir(model_dir: Path | str, fallback_dirs: Sequence[Path | str] = ()) -> Path:
    searched = tokenizer_search_path(model_dir, fallback_dirs)
    for candidate in searched:
        if _is_tokenizer_dir(candidate):
            return candidate
    places = "\n  ".join(str(p) for p in searched)
    raise TokenizerNotFoundError(
        "no Qwen2.5 tokenizer found (tokenizer.json, or vocab.json + merges.txt). Looked in:\n  "
        f"{places}\nPut the Qwen2.5 tokenizer files into the model folder or into a 'tokenizer' folder beside it."
    )


def load_tokenizer(model_dir: Path | str, fallback_dirs: Sequence[Path | str] = ()) -> PreTrainedTokenizerBase:
    # Not AutoTokenizer: it reads the folder's config.json to pick a class, and an
    # original-layout VibeVoice config.json is not one it knows (transformers 5.17).
    folder = find_tokenizer_dir(model_dir, fallback_dirs)
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)

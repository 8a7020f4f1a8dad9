"""Shared test set-up.

- No network: tests may only talk to loopback (ComfyUI on 127.0.0.1) and local files.
  A model or tokenizer that tries to reach a hub fails at once with a clear error.
- Markers (declared in pyproject.toml):
    gpu      skipped where torch.cuda.is_available() is False (the CPU machines, CI)
    comfy    needs the real ComfyUI from scripts/setup.sh
    browser  needs that ComfyUI and Debian's /usr/bin/chromium
  Outside CI a missing ComfyUI or Chromium skips those tests; with CI=true it fails
  them, so a broken set-up can never pass as "all skipped".
- Fixtures: comfyui_dir, comfy_server (a running ComfyUI with this pack installed),
  chromium_launch_options (for playwright's chromium.launch(**options)).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import netguard
from comfy_server import CHROMIUM_ARGS, CHROMIUM_PATH, REPO_ROOT, ComfyServer

CHILD_SITE = Path(__file__).parent / "child_site"  # its sitecustomize.py blocks the network in child processes

# Set at import time, before any test module imports transformers/huggingface_hub
# (they read these once): everything must come from local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, where the set-up must be complete."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing test dependency is a failure)", pytrace=False)
    pytest.skip(reason)


# ---- network block -----------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def block_network():
    """Refuse every socket connection that is not to loopback or an AF_UNIX path, here and in
    every Python process the tests start (they inherit PYTHONPATH)."""
    with pytest.MonkeyPatch.context() as mp:
        netguard.install(mp)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CHILD_SITE), os.environ.get("PYTHONPATH")])))
        yield


# ---- markers ----------------------------------------------------------------------------------
_cuda_available: bool | None = None


def cuda_available() -> bool:
    """torch.cuda.is_available(), imported only when a gpu test asks (torch is slow to import)."""
    global _cuda_available
    if _cuda_available is None:
        try:
            import torch

            _cuda_available = bool(torch.cuda.is_available())
        except Exception:
            _cuda_available = False
    return _cuda_available


def comfyui_path() -> Path:
    return Path(os.environ.get("VIBEVOICE_COMFYUI_DIR") or REPO_ROOT / ".cache" / "comfyui").resolve()


def _require_comfyui() -> Path:
    path = comfyui_path()
    if not (path / "main.py").is_file():
        skip_or_fail(f"ComfyUI not found at {path} (run: bash scripts/setup.sh, or set VIBEVOICE_COMFYUI_DIR)")
    return path


def _require_browser() -> None:
    if not os.access(CHROMIUM_PATH, os.X_OK):
        skip_or_fail(f"{CHROMIUM_PATH} is missing (bash scripts/setup.sh installs Debian's chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("the playwright package is missing (pip install -r requirements-dev.txt)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not cuda_available():
        pytest.skip("needs a CUDA GPU (run on the GPU machine)")
    if item.get_closest_marker("comfy") is not None or item.get_closest_marker("browser") is not None:
        _require_comfyui()
    if item.get_closest_marker("browser") is not None:
        _require_browser()


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The real ComfyUI tree (.cache/comfyui, or $VIBEVOICE_COMFYUI_DIR)."""
    return _require_comfyui()


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir: Path):
    """A running ComfyUI (CPU) with this pack in its custom_nodes, shared by the session.

    Started on first use only. Tests share it: use unique names in models_dir,
    input_dir and output_dir. Its log is test-artifacts/comfyui-server.log.
    """
    server = ComfyServer(comfyui_dir)
    try:
        server.start(timeout=120)
    except (RuntimeError, TimeoutError) as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chromium_launch_options() -> dict:
    """Keyword arguments for playwright's `chromium.launch(**options)` with Debian's Chromium.

    Also route each page's non-localhost requests to abort:
    comfy_server.block_external_requests(context).
    """
    _require_browser()
    return {"executable_path": CHROMIUM_PATH, "headless": True, "args": list(CHROMIUM_ARGS)}


# ---- synthetic models ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A speaking tiny VibeVoice in Microsoft's original layout, with its own tokenizer (hop 4)."""
    from vibevoice_offload.synthetic import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("tiny") / "VibeVoice-tiny")


@pytest.fixture()
def two_voices():
    """Two short clips of different rates and channel counts, seeded."""
    import torch

    g = torch.Generator().manual_seed(1)
    return {1: (torch.randn(1, 40, generator=g) * 0.1, 24000), 2: (torch.randn(2, 30, generator=g) * 0.1, 16000)}

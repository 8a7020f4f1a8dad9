"""The pack loads into a real ComfyUI 0.3.75 without import errors."""

import re
import uuid
from pathlib import Path

import pytest

from comfy_server import PACK_FOLDER_NAME

RELEASED_CONFIGS = Path(__file__).resolve().parent / "data"

pytestmark = pytest.mark.comfy


def test_server_boots_with_the_pack(comfy_server):
    info = comfy_server.object_info()
    # core nodes are there: the server really finished loading
    assert "SaveAudio" in info and "KSampler" in info

    log = comfy_server.log_text()
    pack_lines = [line for line in log.splitlines() if PACK_FOLDER_NAME in line]
    for line in pack_lines:
        assert "IMPORT FAILED" not in line, line
        assert "Cannot import" not in line, line
        assert "Error while calling comfy_entrypoint" not in line, line
        assert "Skip " not in line, line
    # ComfyUI lists every custom node folder it imported, with its time:
    #   "   0.0 seconds: <base>/custom_nodes/ComfyUI-VibeVoice-Offload"
    assert any(re.search(r"\d+\.\d seconds: .*" + re.escape(PACK_FOLDER_NAME) + "$", l) for l in pack_lines), (
        "the pack is not in ComfyUI's custom node import list:\n" + comfy_server.log_tail()
    )


def test_models_folder_is_the_test_controlled_one(comfy_server):
    """ComfyUI's loader lists what the test puts into `models_dir` (--base-directory's
    models/vibevoice): model folders with a config.json, directly or one level down, and
    not a folder without one."""
    tag = uuid.uuid4().hex[:8]
    config = (RELEASED_CONFIGS / "VibeVoice-1.5B" / "config.json").read_text()
    for name in (f"boot-{tag}", f"org-{tag}/nested-{tag}"):
        (comfy_server.models_dir / name).mkdir(parents=True)
        (comfy_server.models_dir / name / "config.json").write_text(config)
    (comfy_server.models_dir / f"no-config-{tag}").mkdir()

    loader = comfy_server.object_info("VibeVoiceOffloadLoader")["VibeVoiceOffloadLoader"]
    spec = loader["input"]["required"]["model"]
    options = spec[1].get("options") or spec[0]  # V3 combos carry their options in the spec's dict
    listed = {name for name in options if tag in name}
    assert listed == {f"boot-{tag}", f"org-{tag}/nested-{tag}"}, options

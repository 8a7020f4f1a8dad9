"""The pack loads into a real ComfyUI 0.3.75 without import errors."""

import re

import pytest

from comfy_server import PACK_FOLDER_NAME

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
    # --base-directory puts models/ (and so models/vibevoice) in the temp base folder
    assert comfy_server.models_dir.is_dir()
    assert comfy_server.models_dir.parts[-2:] == ("models", "vibevoice")
    assert str(comfy_server.models_dir).startswith(str(comfy_server.base_dir))

"""The pack's ComfyUI nodes (V3 schema). Everything that imports ComfyUI lives in this package."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .generate import VibeVoiceGenerateDialog
from .loader import VibeVoiceOffloadLoader
from .offload_config import VibeVoiceOffloadConfig
from .routes import register_routes
from .shared import register_models_folder

register_models_folder()
register_routes()  # POST /vibevoice_offload/plan for the web extension (web/); once, only inside ComfyUI


class VibeVoiceOffloadExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [VibeVoiceOffloadLoader, VibeVoiceOffloadConfig, VibeVoiceGenerateDialog]


async def comfy_entrypoint() -> VibeVoiceOffloadExtension:
    return VibeVoiceOffloadExtension()

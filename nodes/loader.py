"""Load VibeVoice (Offloaded): a model folder from models/vibevoice -> VIBEVOICE_MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from .model_patcher import LOAD_DTYPES, OffloadSettings, VibeVoiceModel, get_patcher
from .shared import CATEGORY, OffloadConfigType, VibeVoiceModelType, list_model_folders, resolve_model_folder, tokenizer_fallbacks


class VibeVoiceOffloadLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VibeVoiceOffloadLoader",
            display_name="Load VibeVoice (Offloaded)",
            category=CATEGORY,
            description="Loads a VibeVoice model into host memory. It moves to the GPU when Generate Dialog runs, as much of it as ComfyUI's VRAM budget allows; the rest streams from host memory.",
            inputs=[
                io.Combo.Input("model", options=list_model_folders(), tooltip="A model folder (with config.json and *.safetensors) inside models/vibevoice, e.g. VibeVoice-1.5B or VibeVoice-Large, original or -hf layout. Without tokenizer files in it, models/vibevoice/tokenizer or ComfyUI's bundled Qwen2.5 tokenizer is used (never the network)."),
                io.Combo.Input("dtype", options=list(LOAD_DTYPES), default="bf16", tooltip="Weights in memory. bf16: recommended. fp16: older GPUs. fp32: CPU or debugging (twice the memory). fp8: decoder layers stored as fp8 (half their memory), computed in bf16."),
                OffloadConfigType.Input("offload_config", optional=True, tooltip="From an Offload Config node. Not connected: mode auto, bf16 streaming, pinned memory."),
            ],
            outputs=[VibeVoiceModelType.Output("vibevoice_model", display_name="model", tooltip="Connect to Generate Dialog. Loader nodes of the same folder and dtype share one copy of the weights.")],
        )

    @classmethod
    def execute(cls, model, dtype, offload_config=None) -> io.NodeOutput:
        patcher = get_patcher(resolve_model_folder(model), dtype, tokenizer_fallbacks())
        return io.NodeOutput(VibeVoiceModel(patcher, offload_config or OffloadSettings(), model))

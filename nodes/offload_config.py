"""Offload Config: how the decoder layers are split between VRAM and host memory."""

from __future__ import annotations

from comfy_api.latest import io

from ..vibevoice_offload.planner import PRESETS
from .model_patcher import MODES, STREAM_DTYPES, OffloadSettings
from .shared import CATEGORY, OffloadConfigType


class VibeVoiceOffloadConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VibeVoiceOffloadConfig",
            display_name="Offload Config",
            category=CATEGORY,
            description="How VibeVoice's decoder layers are split between VRAM and host memory. Connect to Load VibeVoice (Offloaded); without it the loader uses mode auto.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="auto", tooltip="auto: keep as many decoder layers on the GPU as the VRAM ComfyUI grants allows, stream the rest. preset: a fixed share of the layers (see preset). manual: exactly 'resident_layers'. In every mode ComfyUI can take VRAM back for other models and the next run reclaims it."),
                io.Combo.Input("preset", options=list(PRESETS), default="balanced", tooltip="Used in mode preset. Share of the decoder layers kept on the GPU: light 75%, moderate 50%, balanced 35%, aggressive 15%, extreme 0% (every layer streamed)."),
                io.Int.Input("resident_layers", default=14, min=0, max=128, tooltip="Used in mode manual: decoder layers kept on the GPU (both released models have 28). Fewer than asked are kept when ComfyUI's VRAM budget is smaller."),
                io.Combo.Input("stream_dtype", options=list(STREAM_DTYPES), default="bf16", tooltip="How streamed layers cross to the GPU. bf16: as loaded, identical output. bf16-packed: the same bits in 3/4 of the bytes (a third faster to stream, identical output; needs Triton on NVIDIA). fp8: half the bytes (about twice as fast to stream), a small quality cost."),
                io.Int.Input("prefetch_depth", default=2, min=2, max=8, tooltip="GPU slots in the streaming ring: one layer computing while the next ones copy. 2 is enough on most systems; more costs one layer of VRAM each."),
                io.Boolean.Input("pinned", default=True, tooltip="Stream from page-locked host memory (several times faster). Ignored with ComfyUI's --disable-pinned-memory or without a CUDA GPU."),
                io.Float.Input("target_utilisation", default=0.9, min=0.1, max=1.0, step=0.01, tooltip="Used in mode auto: the share of ComfyUI's VRAM budget for weights that the plan may fill; the rest is headroom."),
            ],
            outputs=[OffloadConfigType.Output("offload_config", display_name="offload_config", tooltip="Connect to Load VibeVoice (Offloaded).")],
        )

    @classmethod
    def execute(cls, mode, preset, resident_layers, stream_dtype, prefetch_depth, pinned, target_utilisation) -> io.NodeOutput:
        settings = OffloadSettings(mode, preset, resident_layers, stream_dtype, prefetch_depth, pinned, target_utilisation)
        return io.NodeOutput(settings)

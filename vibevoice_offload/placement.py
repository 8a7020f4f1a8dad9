"""Choosing where a run's weights live outside ComfyUI (the CLI): a plan from the planner
for this prompt and VRAM budget, executed by the OffloadEngine. Inside ComfyUI the nodes'
ModelPatcher makes the same choice from the budget ComfyUI grants."""

from __future__ import annotations

import torch

from . import planner
from .config import hop_length
from .frame_loop import GenerationSettings
from .offload.engine import OffloadEngine
from .pipeline import VibeVoice
from .plan import StreamDtype
from .prompt import Prompt


def offload_engine(
    vv: VibeVoice,
    prompt: Prompt,
    settings: GenerationSettings,
    *,
    mode: str = "auto",
    resident_layers: int | None = None,
    stream_dtype: StreamDtype = "bf16",
    budget_bytes: int | None = None,
    device: torch.device | str = "cuda",
) -> OffloadEngine:
    """A loaded engine for `vv` on `device`: `resident_layers` if given, else the preset, the
    most that fit (auto, default budget: 90% of free VRAM), or every layer (`none`)."""
    config = vv.checkpoint.config
    layers = config.text_config.num_hidden_layers
    workload = planner.Workload.for_prompt(
        config, prompt.length, prompt.voice_mask.sum(dim=1).tolist(), settings.frame_cap(prompt.length, hop_length(config))
    )
    options = dict(stream_dtype=stream_dtype, dtype=vv.checkpoint.dtype, workload=workload)
    if torch.device(device).type == "cpu" and mode == "auto" and resident_layers is None:
        mode = "none"  # no VRAM to budget: every layer stays where it computes
    if budget_bytes is None and mode == "auto" and resident_layers is None:
        budget_bytes = planner.budget_from_free(planner.free_vram_bytes(torch.device(device).index or 0))
    if resident_layers is not None or mode == "none":
        count = layers if resident_layers is None else resident_layers
        plan = planner.plan_manual(config, count, budget_bytes=budget_bytes, **options)
    elif mode == "auto":
        plan = planner.plan_auto(config, budget_bytes, link_gbps=planner.link_bandwidth_gbps(device=device), **options)
    else:
        plan = planner.plan_preset(config, mode, budget_bytes, **options)
    engine = OffloadEngine(vv.model, plan, device)
    engine.load()
    return engine

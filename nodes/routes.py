"""The pack's HTTP route: what an Offload Config would do, for the node's drawing in the browser.

    POST /vibevoice_offload/plan
    {"model": "VibeVoice-1.5B",        folder name under models/vibevoice (optional)
     "size": "1.5B" | "Large",         a released config, when the folder is missing or not given
     "dtype": "bf16",                  the loader's dtype (bf16, fp16, fp32, fp8)
     "mode": "auto", "preset": "balanced", "resident_layers": 14, "stream_dtype": "bf16",
     "prefetch_depth": 2, "pinned": true, "target_utilisation": 0.9,
     "minutes": 5.0}                   audio the KV cache is sized for (default 10)
    -> {"resident_layers", "streamed_layers", "num_layers", "estimated_vram_bytes",
        "host_ram_bytes", "card_vram_bytes", "free_vram_bytes", "budget_bytes",
        "predicted_ms_per_frame", "rtf", "link_gbps", "error", ...}

Only the planner runs (config.json and a meta-device census: no weights, no GPU work), in a
worker thread so ComfyUI's event loop never waits on it. Every answer is JSON: a plan that
does not fit the VRAM budget comes back with its numbers and `error` (the PlanError
message); a malformed request gets HTTP 400, an unexpected failure HTTP 500, both with
`error`. The numbers are planner estimates, not measurements.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("VibeVoiceOffload")

ROUTE = "/vibevoice_offload/plan"
_registered = False

_LOAD_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}


class BadRequest(ValueError):
    """The request body cannot be read as a plan request (HTTP 400)."""


def _field(body: dict, name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
            return value
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a {kind.__name__}, got {value!r}") from None


def _device_memory() -> tuple[int | None, int | None]:
    """(total, free) bytes of ComfyUI's torch device, None on the CPU (--cpu or no GPU).

    Free counts what ComfyUI could give a VibeVoice run: the device's free memory (with
    torch's cached blocks), plus the VibeVoice weights already on it, less ComfyUI's reserve."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if getattr(device, "type", "cpu") != "cuda":
        return None, None
    total = int(mm.get_total_memory(device))
    free = int(mm.get_free_memory(device))
    try:
        from .model_patcher import registered_patchers

        free += sum(int(p.loaded_size()) for p in registered_patchers() if p.load_device == device)
    except Exception:  # the patcher registry is an optimisation of the estimate, never a failure
        pass
    reserve = int(getattr(mm, "extra_reserved_memory", lambda: 0)())
    return total, max(0, min(total, free) - reserve)


def _link_gbps() -> tuple[float, str]:
    """The measured pinned link speed if a run already cached it, else the PCIe 4 default.
    Never measures here: that would put 256 MiB on the GPU behind ComfyUI's back."""
    from ..vibevoice_offload import planner

    try:
        value = planner.cached_link_gbps()
    except RuntimeError:  # a CUDA device that cannot be queried
        value = None
    if value is not None and value > 0:
        return value, "measured earlier on this GPU"
    return planner.PCIE_DEFAULTS[planner.DEFAULT_PCIE_GEN], f"PCIe {planner.DEFAULT_PCIE_GEN} default"


def _config_for(body: dict) -> tuple[Any, str, str | None]:
    """(VibeVoiceConfig, label of its source, note) from `model`, else `size`."""
    from ..vibevoice_offload import planner
    from ..vibevoice_offload.config import load_config
    from ..vibevoice_offload.errors import VibeVoiceError
    from .shared import resolve_model_folder

    model = body.get("model")
    size = body.get("size")
    note = None
    if model:
        if not isinstance(model, str):
            raise BadRequest(f"model must be a folder name, got {model!r}")
        try:
            folder = resolve_model_folder(model)
            return load_config(Path(folder))[0], model, None
        except (FileNotFoundError, ValueError, OSError, VibeVoiceError) as exc:
            if not size:
                raise planner.PlanError(str(exc)) from None
            note = f"{model} not found: planned with the released {size} config"
    if not size:
        size = "Large"
    if size not in planner.SIZES:
        raise BadRequest(f"size must be one of {', '.join(planner.SIZES)}, got {size!r}")
    return planner.load_size_config(size), f"VibeVoice-{size}", note


def compute_plan(body: dict) -> dict[str, Any]:
    """The planner's answer for one Offload Config (see the module docstring). Raises
    BadRequest for a malformed request; a plan that does not fit is not an exception."""
    import torch

    from ..vibevoice_offload import planner
    from .model_patcher import MODES, STREAM_DTYPES, compute_buffers_for, node_plan

    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    mode = _field(body, "mode", str, "auto")
    preset = _field(body, "preset", str, "balanced")
    resident = _field(body, "resident_layers", int, 14)
    stream_dtype = _field(body, "stream_dtype", str, "bf16")
    depth = _field(body, "prefetch_depth", int, 2)
    pinned = _field(body, "pinned", bool, True)
    utilisation = _field(body, "target_utilisation", float, 0.9)
    minutes = _field(body, "minutes", float, planner.DEFAULT_MINUTES)
    load_dtype = _field(body, "dtype", str, "bf16")
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if preset not in planner.PRESETS:
        raise BadRequest(f"preset must be one of {', '.join(planner.PRESETS)}, got {preset!r}")
    if stream_dtype not in STREAM_DTYPES:
        raise BadRequest(f"stream_dtype must be one of {', '.join(STREAM_DTYPES)}, got {stream_dtype!r}")
    if load_dtype not in _LOAD_DTYPES:
        raise BadRequest(f"dtype must be one of {', '.join(_LOAD_DTYPES)}, got {load_dtype!r}")
    if depth < 2 or resident < 0 or not 0 < utilisation <= 1 or not 0 < minutes <= 24 * 60:
        raise BadRequest("need prefetch_depth >= 2, resident_layers >= 0, 0 < target_utilisation <= 1, 0 < minutes <= 1440")

    out: dict[str, Any] = {"mode": mode, "stream_dtype": stream_dtype, "minutes": minutes, "error": None, "note": None}
    try:
        config, source, note = _config_for(body)
    except planner.PlanError as exc:
        out["error"] = str(exc)
        return out
    out["note"] = note
    dtype = getattr(torch, _LOAD_DTYPES[load_dtype])
    workload = planner.Workload.for_minutes(minutes)
    n = config.text_config.num_hidden_layers
    total, free = _device_memory()
    budget = None if free is None else int(free * (utilisation if mode == "auto" else 1.0))
    kw = dict(stream_dtype=stream_dtype, prefetch_depth=depth, pinned=pinned, dtype=dtype, workload=workload)
    link, link_source = _link_gbps()
    # plan_auto rates plans by speed: it must never measure the link from here. It plans
    # the node's engine in auto (`node_plan`): staged layers decoded on use, residents kept
    # as the node keeps them (its residency follows ComfyUI's grant). Presets and manual
    # counts decode a layer ahead, as the planner's own presets do.
    auto_kw = dict(
        kw, link_gbps=link, compute_buffers=compute_buffers_for("auto"), encoded_residents=planner.encoded_residents_for(stream_dtype),
    )

    error = None
    if mode == "auto":
        if budget is None:  # ComfyUI on the CPU grants everything: every layer stays on the device, decoded
            plan = node_plan(mode, n, stream_dtype, depth, pinned, encoded_residents=False)
        else:
            try:
                # as the patcher chooses (`VibeVoicePatcher._residencies`): every layer
                # decoded where that fits, else auto with the node's residents
                full = node_plan(mode, n, stream_dtype, depth, pinned, encoded_residents=False)
                if planner.encoded_residents_for(stream_dtype) and planner.estimate_for_workload(config, full, dtype, workload).total_vram <= budget:
                    plan = full
                else:
                    plan = planner.plan_auto(config, budget, **auto_kw)
            except planner.PlanError as exc:
                error, plan = str(exc), node_plan(mode, 0, stream_dtype, depth, pinned)
    else:
        wanted = planner.preset_resident_layers(preset, n) if mode == "preset" else min(resident, n)
        if mode == "manual" and resident > n:
            out["note"] = f"the model has {n} decoder layers: all {n} stay resident"
        # every layer wanted: the patcher tries them decoded first (`VibeVoicePatcher._residencies`)
        plan = node_plan(mode, wanted, stream_dtype, depth, pinned, encoded_residents=False if wanted == n else None)
        if budget is not None:
            try:
                if mode == "preset":
                    planner.plan_preset(config, preset, budget, **kw)
                else:
                    planner.plan_manual(config, wanted, budget_bytes=budget, **kw)
            except planner.PlanError as exc:
                error = str(exc) + " (ComfyUI then keeps fewer layers resident than asked.)"

    est = planner.estimate_for_workload(config, plan, dtype, workload)
    ms = planner.predict_ms_per_frame(config, plan, link, dtype=dtype)
    out.update(
        model=source,
        model_label=planner.model_label(config),
        num_layers=n,
        resident_layers=plan.resident_layers,
        streamed_layers=n - plan.resident_layers,
        estimated_vram_bytes=int(est.total_vram),
        host_ram_bytes=int(est.host_ram),
        card_vram_bytes=total,
        free_vram_bytes=free,
        budget_bytes=budget,
        predicted_ms_per_frame=ms,
        rtf=planner.real_time_factor(config, ms),
        link_gbps=link,
        link_source=link_source,
        error=error,
    )
    return out


async def plan_handler(request):
    from aiohttp import web

    try:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not JSON") from None
        result = await asyncio.get_running_loop().run_in_executor(None, compute_plan, body)
        return web.json_response(result)
    except BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Exception as exc:  # the route must never take the page down: say what happened
        log.exception("VibeVoice: %s failed", ROUTE)
        return web.json_response({"error": f"planner failed: {type(exc).__name__}: {exc}"}, status=500)


def register_routes() -> bool:
    """Add the route to ComfyUI's server once. Returns False outside a running ComfyUI (the
    nodes imported by tests or scripts): nothing to register on."""
    global _registered
    if _registered:
        return True
    server = sys.modules.get("server")  # ComfyUI's server module, imported by main.py before custom nodes
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None:
        return False
    routes.post(ROUTE)(plan_handler)
    _registered = True
    return True

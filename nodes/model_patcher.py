"""ComfyUI's view of a VibeVoice model: a ModelPatcher whose weights our OffloadEngine places.

ComfyUI decides how much VRAM each model may hold (`comfy.model_management`); this file
translates its calls into offload-engine operations and keeps its counters true:

    load_models_gpu([patcher], memory_required=KV + activations)
      -> partially_load(device, extra)   budget = resident bytes + extra; auto mode keeps the
                                         most decoder layers whose weights fit the budget
    free_memory() for another model
      -> partially_unload(device, n)     resident layers become streamed ones until n bytes
                                         are free; returns the bytes really freed
      -> detach(unpatch_all=True)        everything off the GPU (the engine's unload)
    /free, unload_all_models()           the same detach

`model_loaded_weight_memory` (what `loaded_size()` reports and what every unload decision
reads) is re-read from the engine after each of these, so it always equals the bytes the
engine really holds on the device. `size` is the model's true host size.

There is one patcher per (weights folder, dtype) in a weak registry: loader nodes with
different offload configs share one host copy, and the offload config travels with the
VIBEVOICE_MODEL handle to be applied when a run loads the model. The nn.Module never
references the patcher or the engine (ComfyUI's "Potential memory leak" check).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

import comfy.model_management as mm
import comfy.model_patcher
from comfy.cli_args import args as comfy_args

from ..vibevoice_offload import planner
from ..vibevoice_offload.config import hop_length
from ..vibevoice_offload.frame_loop import GenerationResult, GenerationSettings
from ..vibevoice_offload.pipeline import VibeVoice
from ..vibevoice_offload.plan import STREAM_DTYPES, OffloadPlan
from ..vibevoice_offload.prompt import build_prompt

log = logging.getLogger("VibeVoiceOffload")

MODES = ("auto", "preset", "manual")
LOAD_DTYPES = ("bf16", "fp16", "fp32", "fp8")
UNLIMITED = 1e30  # ComfyUI passes 1e32 extra memory for "load it all" (CPU, --highvram)


@dataclass(frozen=True)
class OffloadSettings:
    """What the Offload Config node outputs (OFFLOAD_CONFIG); applied at run time."""

    mode: str = "auto"
    preset: str = "balanced"
    resident_layers: int = 0
    stream_dtype: str = "bf16"
    prefetch_depth: int = 2
    pinned: bool = True
    target_utilisation: float = 0.9

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"offload mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "preset" and self.preset not in planner.PRESETS:
            raise ValueError(f"unknown offload preset {self.preset!r}; choose one of {', '.join(planner.PRESETS)}")
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"stream dtype must be one of {STREAM_DTYPES}, got {self.stream_dtype!r}")
        if self.prefetch_depth < 2:
            raise ValueError(f"prefetch depth must be at least 2, got {self.prefetch_depth}")
        if not 0 < self.target_utilisation <= 1:
            raise ValueError(f"target utilisation must be in (0, 1], got {self.target_utilisation}")

    def wanted_layers(self, num_layers: int) -> int:
        """Resident decoder layers asked for, before ComfyUI's budget has its say."""
        if self.mode == "preset":
            return planner.preset_resident_layers(self.preset, num_layers)
        if self.mode == "manual":
            return max(0, min(int(self.resident_layers), num_layers))
        return num_layers

    def describe(self, pinned: bool | None = None) -> str:
        """One line for logs and stats; `pinned`: what is really used, when known."""
        what = {"auto": "auto", "preset": f"preset {self.preset}", "manual": f"manual, {self.resident_layers} resident layers"}[self.mode]
        pinned = self.pinned if pinned is None else pinned
        return f"{what}, stream {self.stream_dtype}, prefetch {self.prefetch_depth}, {'pinned' if pinned else 'pageable'} host memory"


class EngineSignature(NamedTuple):
    """The settings an engine was built for: the host slabs' (stream dtype, pinning), which
    only a new engine can change, and the ring's, which `OffloadEngine.set_plan` can."""

    stream_dtype: str
    pinned: bool
    prefetch_depth: int
    compute_buffers: int

    @property
    def host(self) -> tuple[str, bool]:
        return self.stream_dtype, self.pinned


def compute_buffers_for(mode: str) -> int:
    """How the node's engine decodes a staged stream dtype (`OffloadPlan.compute_buffers`).
    In auto ComfyUI's grant sets the residency, so decoding on use (one weight-sized buffer)
    gives the two layers of VRAM that decoding ahead takes to resident layers: the planner
    rates that faster at every budget (Large fp8, ring depth 2, 12 GB: 70.0 against 77.3
    ms; 8 GB fits only so). A preset or manual count fixes the residency, and there two
    buffers overlap each layer's decoding with the previous layer's compute (Large fp8
    light: 35.6 against 43.0 ms), as the library's presets do."""
    return 1 if mode == "auto" else 2


def node_plan(
    mode: str, resident_layers: int, stream_dtype: str, prefetch_depth: int, pinned: bool, encoded_residents: bool | None = None,
) -> OffloadPlan:
    """The plan the node's engine runs for these settings, staged layers decoded as
    `compute_buffers_for(mode)` says. bf16-packed keeps its resident layers packed too
    (ComfyUI's grant holds a third more of them, for the same bits) unless
    `encoded_residents` is False: where the grant holds every layer decoded, the patcher
    keeps them so (`VibeVoicePatcher._residencies`)."""
    encoded = planner.encoded_residents_for(stream_dtype) if encoded_residents is None else encoded_residents
    return OffloadPlan(
        int(resident_layers), stream_dtype, int(prefetch_depth), pinned, compute_buffers=compute_buffers_for(mode),
        encoded_residents=encoded,
    )


def pinning_allowed(device: torch.device) -> bool:
    """Pinned host memory only for CUDA devices and never with ComfyUI's --disable-pinned-memory."""
    return device.type == "cuda" and not getattr(comfy_args, "disable_pinned_memory", False)


def _engine_class():
    # Imported late: the engine is its own module of the library (issue 3).
    from ..vibevoice_offload.offload.engine import OffloadEngine

    return OffloadEngine


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        try:
            return _json_safe(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


class VibeVoicePatcher(comfy.model_patcher.ModelPatcher):
    """A VibeVoice model as ComfyUI's model management sees it (see the module docstring)."""

    def __init__(
        self, vibevoice: VibeVoice, load_device: torch.device, offload_device: torch.device, *,
        key: tuple[str, str],
    ):
        super().__init__(vibevoice.model, load_device, offload_device, size=vibevoice.checkpoint.nbytes)
        self.vibevoice = vibevoice
        self.key = key
        self.name = Path(key[0]).name
        self.num_layers = int(vibevoice.checkpoint.config.text_config.num_hidden_layers)
        self.engine = None
        self.engine_signature: EngineSignature | None = None
        self.settings = OffloadSettings()
        self.last_budget: float | None = None  # weight budget of the last load, bytes (None: unlimited)
        self.lock = threading.RLock()
        self._sync()

    # ---- engine ---------------------------------------------------------------------------
    @property
    def engine_device(self) -> torch.device:
        return torch.device("cpu") if self.load_device.type == "cpu" else self.load_device

    def _plan(self, resident_layers: int, encoded_residents: bool | None = None) -> OffloadPlan:
        s = self.settings
        pinned = bool(s.pinned) and pinning_allowed(self.engine_device)
        return node_plan(s.mode, resident_layers, s.stream_dtype, s.prefetch_depth, pinned, encoded_residents)

    def _residencies(self, wanted: int) -> Iterator[tuple[int, bool]]:
        """(resident layers, packed residents) to try, most resident first. With bf16-packed
        and every layer wanted: every layer decoded first (packed residents are decoded
        every frame, for nothing where no layer streams: Large about 13 ms a frame), then
        packed (a third more fit the same VRAM), then fewer."""
        packed = self._plan(0).encoded_residents
        if packed and wanted == self.num_layers:
            yield wanted, False
        for n in range(wanted, -1, -1):
            yield n, packed

    def _signature(self) -> EngineSignature:
        plan = self._plan(0)
        return EngineSignature(plan.stream_dtype, plan.pinned, plan.prefetch_depth, plan.compute_buffers)

    def resident_layers(self) -> int:
        if self.engine is None:
            return 0
        n = getattr(self.engine, "resident_layers", None)
        if n is None:
            n = self.engine.plan.resident_layers
        return int(n)

    def engine_loaded(self) -> bool:
        return self.engine is not None and bool(self.engine.loaded)

    def _sync(self) -> int:
        """Copy the engine's true resident bytes into ComfyUI's counters."""
        resident = int(self.engine.resident_bytes) if self.engine_loaded() else 0
        self.model.model_loaded_weight_memory = resident
        self.model.model_lowvram = self.engine_loaded() and self.resident_layers() < self.num_layers
        self.model.lowvram_patch_counter = 0
        self.model.model_offload_buffer_memory = 0
        return resident

    def _new_engine(self, resident_layers: int, encoded_residents: bool | None = None):
        """An engine for the current settings; building one only plans (no memory is moved)."""
        cp = self.vibevoice.checkpoint
        # fp8 streaming rounds the streamed layers: the engine reads a layer back from disk when it
        # becomes resident or the engine closes, so the audio never depends on what was streamed before.
        source = None if cp.fp8_layers else cp.read_decoder_layer
        self.engine = _engine_class()(self.model, self._plan(resident_layers, encoded_residents), self.engine_device, layer_source=source)
        self.engine_signature = self._signature()
        return self.engine

    def weight_bytes(self, resident_layers: int, encoded_residents: bool | None = None) -> int:
        """Device bytes the engine holds with `resident_layers` resident (its other resident
        parts, the resident layers and the streaming ring), packed or not as `_plan` says;
        the load and unload paths check the engine's real count."""
        encoded = self._plan(resident_layers, encoded_residents).encoded_residents
        if self.engine is None:
            self._new_engine(self.settings.wanted_layers(self.num_layers))
        elif self.engine_signature != self._signature():
            # The settings changed since this engine was built: price the new plan instead.
            cp = self.vibevoice.checkpoint
            plan = self._plan(resident_layers, encoded)
            est = planner.estimate(cp.config, plan, dtype=cp.dtype, voice_samples=0, max_frames=1, text_tokens=1)
            return int(est.weights)
        return int(self.engine.resident_bytes_for(resident_layers, encoded))

    def _close_engine(self) -> None:
        engine, self.engine, self.engine_signature = self.engine, None, None
        if engine is not None:
            try:
                engine.close()
            finally:
                self._sync()

    def configure(self, settings: OffloadSettings) -> None:
        """Use `settings` from the next load on. A change of stream dtype or pinning needs a
        new engine: the old one is closed first (its VRAM returns now, so ComfyUI's next
        budget sees it free). A change of ring (prefetch depth, compute buffers) keeps it."""
        with self.lock:
            self.settings = settings
            if self.engine is None or self.engine_signature == self._signature():
                return
            old, new = self.engine_signature, self._signature()
            if old.host == new.host and hasattr(self.engine, "set_plan"):
                # Only the ring changed: keep the host slabs, rebuild the ring on the next load.
                self._unload()
                self.engine.set_plan(self._plan(self.resident_layers(), self.engine.plan.encoded_residents))
                self.engine_signature = new
                return
            log.info("VibeVoice: offload settings changed (%s): rebuilding the offload engine", settings.describe())
            self._close_engine()  # an fp8 engine gives its layers back read from disk, not rounded

    def _choose_layers(self, budget: float | None) -> tuple[int, bool]:
        """The first of `_residencies` (up to what the config asks for) whose device bytes fit
        `budget`: (resident layers, packed residents)."""
        residencies = self._residencies(self.settings.wanted_layers(self.num_layers))
        if budget is None:
            return next(residencies)
        if self.settings.mode == "auto":
            budget *= self.settings.target_utilisation
        for n, encoded in residencies:
            if self.weight_bytes(n, encoded) <= budget:
                return n, encoded
        return 0, self._plan(0).encoded_residents

    def _place(self, resident_layers: int, encoded_residents: bool | None = None) -> None:
        """Make the engine hold exactly `resident_layers` resident layers (packed or not as
        `_plan` says), loaded on the device."""
        encoded = self._plan(resident_layers, encoded_residents).encoded_residents
        if self.engine is None:
            self._new_engine(resident_layers, encoded)
        elif self.resident_layers() != resident_layers or self.engine.plan.encoded_residents != encoded:
            self.engine.set_resident_layers(resident_layers, encoded)
        if not self.engine.loaded:
            self.engine.load()
        self._sync()

    # ---- ComfyUI's model-management calls --------------------------------------------------
    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self._sync()

    def get_ram_usage(self) -> int:
        return self.size

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.engine_loaded() else self.offload_device

    def model_dtype(self) -> torch.dtype:
        return self.vibevoice.checkpoint.dtype

    def lowvram_patch_counter(self) -> int:
        return 0

    def clone(self) -> "VibeVoicePatcher":
        # One patcher per weights: a clone would be a second owner of the same engine.
        return self

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
        """LoadedModel.model_load: this model may hold `extra_memory` more bytes (1e32: all)."""
        with self.lock:
            before = self._sync()
            budget = None if extra_memory >= UNLIMITED else max(0.0, before + extra_memory)
            self.last_budget = budget
            n, encoded = self._choose_layers(budget)
            if self.settings.mode == "auto" and extra_memory >= 0 and self.engine_loaded():
                keep = self.resident_layers()
                if n < keep:  # offered more: never give back what we hold
                    n, encoded = keep, self.engine.plan.encoded_residents
            else:
                keep = 0
            try:
                self._place(n, encoded)
                # The estimate guided the choice; the engine's own count decides.
                while budget is not None and n > keep and self._sync() > budget:
                    n -= 1
                    self._place(n)
            except Exception:
                self.detach()
                raise
            after = self._sync()
            log.info(
                "VibeVoice: %d/%d decoder layers resident, %.1f MB on %s (budget %s)",
                self.resident_layers(), self.num_layers, after / 2**20, self.engine_device,
                "unlimited" if budget is None else f"{budget / 2**20:.1f} MB",
            )
            return max(0, after - before)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False) -> None:
        with self.lock:
            budget = None if full_load or lowvram_model_memory <= 0 or lowvram_model_memory >= UNLIMITED else lowvram_model_memory
            self.last_budget = budget
            self._place(*self._choose_layers(budget))

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if load_weights:
            self.load(device_to, lowvram_model_memory, force_patch_weights, full_load=lowvram_model_memory == 0)
        return self.model

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False) -> int:
        """free_memory for another model: turn resident layers into streamed ones until
        `memory_to_free` bytes are free. Returns the bytes freed; fewer than asked (0 when
        no layer count frees enough) makes ComfyUI detach the model instead."""
        with self.lock:
            if not self.engine_loaded() or memory_to_free <= 0:
                return 0
            before = self._sync()
            current = self.resident_layers()
            target = before - memory_to_free
            for n in range(current - 1, -1, -1):
                if self.weight_bytes(n) <= target:
                    break
            else:
                return 0
            self._place(n)
            while self._sync() > target and n > 0:  # the engine's own count decides
                n -= 1
                self._place(n)
            after = self._sync()
            log.info(
                "VibeVoice: gave up VRAM for another model: %d -> %d resident layers, %.1f MB freed",
                current, n, (before - after) / 2**20,
            )
            return before - after

    def _unload(self) -> None:
        with self.lock:
            if self.engine_loaded():
                before = self._sync()
                self.engine.unload()
                log.info("VibeVoice: unloaded %s from %s (%.1f MB freed)", self.name, self.engine_device, before / 2**20)
            self._sync()

    def detach(self, unpatch_all=True):
        """unpatch_all=True: ComfyUI unloads the model: every engine buffer leaves the device.
        unpatch_all=False: ComfyUI re-registers the model it is about to load: keep all."""
        if unpatch_all:
            self._unload()
        for callback in self.get_all_callbacks(comfy.model_patcher.CallbacksMP.ON_DETACH):
            callback(self, unpatch_all)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True) -> None:
        if unpatch_weights:
            self._unload()

    def __del__(self) -> None:
        # Nothing to do: the engine, its device buffers and host slabs are referenced only
        # by this patcher and are freed with it. (Re-pointing the model's tensors here, as
        # close() does, crashes torch at interpreter shutdown; and the base class's
        # detach(unpatch_all=False) only concerns clones.)
        pass

    # ---- one generation ------------------------------------------------------------------
    def memory_required(self, input_shape=None) -> int:  # noqa: D401 - ComfyUI's name
        return 0

    def run_memory(self, prompt_length: int, voice_samples: list[int], frames: int) -> int:
        """VRAM a run needs besides the weights: KV caches of both CFG branches, the
        activations of the worst phase, and allocator slack (the planner's estimate)."""
        cp = self.vibevoice.checkpoint
        plan = self._plan(self.num_layers)
        est = planner.estimate_for_workload(cp.config, plan, cp.dtype, planner.Workload.for_prompt(cp.config, prompt_length, voice_samples, frames))
        return int(est.total_vram - est.weights)

    def _plan_frame_extension(self, settings: OffloadSettings, workload: planner.Workload) -> None:
        """auto on a GPU: the VRAM the run reserves for encoding the voices (`run_memory`) is idle
        during the frames; the engine holds more layers and slots there. Presets and manual
        settings run exactly the layers they name."""
        layers = slots = 0
        if settings.mode == "auto" and self.engine_device.type == "cuda":
            cp = self.vibevoice.checkpoint
            extended = planner.with_frame_extension(
                cp.config, self.engine.plan, cp.dtype, workload, planner.link_bandwidth_gbps(device=self.engine_device)
            )
            layers, slots = extended.frame_layers, extended.frame_slots
        self.engine.set_frame_extension(layers, slots)

    def generate(
        self,
        settings: OffloadSettings,
        script: str,
        voices: Mapping[int, tuple[torch.Tensor, int]],
        generation: GenerationSettings,
        on_frame: Callable[[int, int, torch.Tensor], Any] | None = None,
    ) -> tuple[GenerationResult, dict[str, Any]]:
        """Load through ComfyUI's model management, then generate. Interrupts propagate."""
        cp = self.vibevoice.checkpoint
        # Validates the script and the voices before anything moves to the GPU.
        prompt = build_prompt(self.vibevoice.tokenizer, cp.config, script, voices)
        frames = generation.frame_cap(prompt.length, hop_length(cp.config))
        voice_samples = [int(m.sum()) for m in prompt.voice_mask]
        prompt_length = prompt.length
        memory_required = self.run_memory(prompt_length, voice_samples, frames)
        del prompt

        self.configure(settings)  # may rebuild the engine (or re-read the weights)
        vv = self.vibevoice
        was_loaded = self.engine_loaded()
        resident_before = self._sync()
        load_start = time.perf_counter()
        mm.load_models_gpu([self], memory_required=memory_required)
        load_s = time.perf_counter() - load_start
        mm.throw_exception_if_processing_interrupted()
        self._plan_frame_extension(settings, planner.Workload.for_prompt(cp.config, prompt_length, voice_samples, frames))

        log.info(
            "VibeVoice: generating up to %d frames with %d/%d decoder layers resident (%s)",
            frames, self.resident_layers(), self.num_layers, settings.describe(self._plan(0).pinned),
        )
        result = _generate_cleanly(vv, script, voices, generation, self.engine, on_frame)

        stats: dict[str, Any] = {
            "model": self.name,
            "dtype": self.key[1],
            "tokenizer": Path(getattr(vv.tokenizer, "name_or_path", "") or "?").name,
            "device": str(self.engine_device),
            "offload": settings.describe(self._plan(0).pinned),
            "resident_layers": self.resident_layers(),
            "num_layers": self.num_layers,
            "stream_dtype": self._plan(0).stream_dtype,
            "prefetch_depth": self._plan(0).prefetch_depth,
            "pinned": self._plan(0).pinned,
            "weights_on_device_bytes": self._sync(),
            "weights_on_device_before_bytes": resident_before,
            "weight_budget_bytes": None if self.last_budget is None else int(self.last_budget),
            "run_memory_estimate_bytes": memory_required,
            "model_host_bytes": self.size,
            "was_loaded": was_loaded,
            "load_s": load_s,
        }
        stats.update(result.stats)
        engine_stats = getattr(self.engine, "stats", None)
        if callable(engine_stats):
            engine_stats = engine_stats()
        if engine_stats:
            stats["engine"] = engine_stats
        return result, _json_safe(stats)


def _clear_traceback(exc: BaseException) -> None:
    """Drop the locals of the frames an exception unwound through (KV caches, activations)
    so their device memory is released now, not when ComfyUI drops the exception."""
    tb = exc.__traceback__
    while tb is not None:
        try:
            tb.tb_frame.clear()
        except RuntimeError:  # a frame that is still executing (ours)
            pass
        tb = tb.tb_next


def _generate_cleanly(vv, script, voices, generation, engine, on_frame) -> GenerationResult:
    try:
        return vv.generate(script, voices, generation, executor=engine, on_frame=on_frame)
    except BaseException as exc:
        _clear_traceback(exc)
        mm.soft_empty_cache()
        raise


# ---- the registry: one patcher per (weights folder, dtype) -----------------------------------------
_REGISTRY: "weakref.WeakValueDictionary[tuple[str, str], VibeVoicePatcher]" = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def get_patcher(model_dir: str | os.PathLike, dtype: str, tokenizer_fallbacks=()) -> VibeVoicePatcher:
    """The patcher of these weights, loading them from disk only if no live handle has them."""
    key = (os.path.realpath(model_dir), dtype)
    with _REGISTRY_LOCK:
        patcher = _REGISTRY.get(key)
        if patcher is None:
            vv = VibeVoice.load(key[0], dtype=dtype, tokenizer_fallbacks=list(tokenizer_fallbacks))
            patcher = VibeVoicePatcher(vv, mm.get_torch_device(), torch.device("cpu"), key=key)
            _REGISTRY[key] = patcher
        return patcher


def registered_patchers() -> list[VibeVoicePatcher]:
    return list(_REGISTRY.values())


@dataclass(eq=False)
class VibeVoiceModel:
    """The VIBEVOICE_MODEL value: the shared patcher plus this loader's offload config."""

    patcher: VibeVoicePatcher
    offload: OffloadSettings
    name: str

    def get_ram_usage(self) -> int:
        return self.patcher.get_ram_usage()

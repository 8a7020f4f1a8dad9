"""The layer offloader: an `Executor` that streams decoder layers through GPU slots.

R decoder layers stay resident on the device (the first R of `plan.residency_order`:
spread over the pass, or for fp8 the first layers); the others live in exact-size host
slabs (pinned) and are copied, one slab per layer, into a fixed ring of S GPU slots on a
dedicated copy stream. Ordering uses events only, never a host synchronisation:

- copy c (layer `streamed[c % k]`, slot `c % S`) first makes the copy stream wait on that
  slot's "free" event: recorded on the compute stream after the slot's previous layer ran,
  or, for a staged format (fp8, bf16-packed) decoded a layer ahead, on the dequantisation
  stream once that layer was decoded out of it;
- staged, decoded ahead (two `compute_buffers`): the layer is decoded (`dequant.py`) on a
  stream of its own into one of the two compute buffers, after its copy and after the
  compute stream is done with that buffer's previous layer, so the next streamed layer's
  decoding is queued while the current one runs (the GPU runs the two in turn: free while
  layers wait for a copy); staged, decoded on use (one): the slot's own module decodes
  each weight as it runs (`gpu_slots.DecodedLinear`), as part of the layer;
- `decoder_layer(i)` makes the compute stream wait on the slot's "copy done" event (decoded
  ahead: the compute buffer's "ready" event);
- `decoder_layer_done(i)` records "free" and issues the next copy in the cyclic order of
  the streamed layers, wrapping into the next pass: while the diffusion head and the
  tokenizers of frame t run (and any resident layers before the first streamed one), the
  first streamed layers of frame t+1 are already crossing the link.

Encoded residents (bf16-packed, `plan.encoded_residents`): the resident layers stay on the
device packed, one "fixed" slot each, and join the cyclic order: each is decoded like a
streamed layer, with no copy. The order of decoded layers is then every layer; the ring
still holds `S` copies in flight.

The frame extension: between the prompt pass and the first frame (`begin_frames`) the
engine makes `plan.frame_layers` more layers resident and rebuilds the ring
`plan.frame_slots` deeper, in the VRAM that encoding the voice prompts needed; the run's
end (`end_run`) restores the plan's residency and ring. Once per run, never inside the
frame loop.

On a CPU device there are no streams: copies and dequantisation are synchronous, the
bookkeeping is the same (CPU tests, and ComfyUI's --cpu mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import statistics
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..bf16_packing import PackingError
from ..plan import OffloadPlan, residency_order
from .dequant import dequant_ops, dequantise, require_packed_kernel
from .gpu_slots import ComputeBuffer, Slot, SlotRing, ring_nbytes, weight_buffer_nbytes
from .host_slabs import (
    FP8, NATIVE, PACKED, HostLayer, SlabLayout, assign_layer, pack_layer, point_layer, release_layer, return_freed_memory,
    unpack_layer,
)

log = logging.getLogger(__name__)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Placement:
    """Moves a module's parameters/buffers to the device and back, keeping the host tensors
    (so unloading costs no copy and host RAM holds each weight once)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.params: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}  # id -> (param, host data)
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []

    def place(self, module: nn.Module) -> None:
        for sub in module.modules():
            for param in sub._parameters.values():
                if param is None or id(param) in self.params or param.device == self.device:
                    continue
                host = param.data
                self.params[id(param)] = (param, host)
                param.data = host.to(self.device)
            for name, buf in list(sub._buffers.items()):
                if buf is None or buf.device == self.device:
                    continue
                self.buffers.append((sub, name, buf))
                sub._buffers[name] = buf.to(self.device)

    def place_tensor(self, owner: nn.Module, name: str) -> None:
        param = owner._parameters.get(name)
        if param is not None and id(param) not in self.params and param.device != self.device:
            self.params[id(param)] = (param, param.data)
            param.data = param.data.to(self.device)

    def release(self) -> None:
        for param, host in self.params.values():
            param.data = host
        for module, name, host in self.buffers:
            module._buffers[name] = host
        self.params.clear()
        self.buffers.clear()


@dataclasses.dataclass
class _Use:
    """One coming use of a layer from the ring: streamed layer `layer` on its way into `slot`
    (`copied`), or an encoded resident in its fixed slot; decoded ahead, the compute buffer
    it has been dequantised into (None until that is enqueued)."""

    layer: int
    slot: Slot
    copied: bool = True
    compute: ComputeBuffer | None = None


class _EventPool:
    """Reusable timing events: no event is created per copy in steady state."""

    def __init__(self) -> None:
        self.free: list[torch.cuda.Event] = []

    def get(self) -> torch.cuda.Event:
        return self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)

    def put(self, *events: torch.cuda.Event) -> None:
        self.free.extend(events)


class OffloadEngine:
    """Executes an `OffloadPlan` for one model on one device (implements `executor.Executor`).

    Lifecycle: `load()` (idempotent) packs host slabs once and places the resident parts;
    per run `begin_run()`, `begin_frames()` and `end_run()` (called by the frame loop);
    `unload()` frees every device buffer, stream and event (slabs are kept for a fast
    reload); `close()` also frees the slabs and gives the model ordinary host tensors back;
    `set_resident_layers(n)` changes residency between runs.

    fp8 rounds a streamed layer's weights, and its host slab is then the only host copy.
    `layer_source(i)` (`LoadedCheckpoint.read_decoder_layer`) reads layer i's own weights
    again: with it, a layer that becomes resident through `set_resident_layers`, or that
    `close()` gives back, has the checkpoint's weights, not the rounded ones, so a run's
    audio does not depend on which layers were streamed before. Without it they stay rounded.
    """

    def __init__(
        self, model: nn.Module, plan: OffloadPlan, device: torch.device | str | None = None, *, timing: bool = True,
        layer_source: Callable[[int], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.model = model
        self._layer_source = layer_source
        self.lm = model.model.language_model
        self.layers = self.lm.layers
        self.num_layers = len(self.layers)
        plan.validate(self.num_layers)
        self.plan = plan
        # The residency and ring in effect: `plan` during prompts and between runs,
        # `plan.in_frames()` from `begin_frames` to `end_run`.
        self._arranged = plan
        device = torch.device(device) if device is not None else _default_device()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = device
        self.is_cuda = device.type == "cuda"
        self.timing = timing and self.is_cuda
        self.dtype = self.lm.norm.weight.dtype
        self._order = residency_order(self.num_layers, plan.stream_dtype)  # the first R of it are resident
        if any(t.is_meta for t in self.layers[0].parameters()):
            raise ValueError("decoder layer 0 has meta tensors: load the weights before building an OffloadEngine")
        self.native = SlabLayout.build(self.layers[0], NATIVE)
        for i, layer in enumerate(self.layers):
            if not self.native.matches(layer):
                raise ValueError(f"decoder layer {i} differs in structure from layer 0; all layers must be alike")
        self.stream_layout = SlabLayout.build(self.layers[0], plan.stream_dtype) if plan.staged else self.native
        if plan.stream_dtype == PACKED:
            require_packed_kernel(device)
        self._host: list[HostLayer | None] = [None] * self.num_layers
        self._resident_buffers: dict[int, torch.Tensor] = {}
        self._placement = _Placement(device)
        self._encoder_placement: _Placement | None = None  # set while a prompt is being encoded
        self._ring: SlotRing | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        self._dequant_stream: torch.cuda.Stream | None = None  # staged layers decoded ahead only
        self._queue: deque[_Use] = deque()  # the coming uses of the ring, in order
        self._next_pos = 0  # position in `_cycle` of the next use
        self._next_slot = 0
        self._next_compute = 0  # decoded ahead: the compute buffer the next layer is decoded into
        # The layers that run from the ring, in order: the streamed ones, and with encoded
        # residents every layer. `_copies_queued` of the uses in `_queue` are copies.
        self._cycle: list[int] = []
        self._from_ring: frozenset[int] = frozenset()
        self._copies_queued = 0
        self._loaded = False
        self._events = _EventPool()
        self._pending_copy: deque = deque()
        self._pending_wait: deque = deque()
        self._pending_pass: deque = deque()  # (start, end) events of whole decoder passes
        self._pass_start: torch.cuda.Event | None = None
        self._pass_ms: list[float] = []
        self._stats_consumed = False
        self.reset_stats()

    # --- Executor ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def resident_layers(self) -> int:
        return self.plan.resident_layers

    def decoder_layer(self, index: int) -> nn.Module:
        if not self._loaded:
            self.load()
        if index == 0 and self.timing:
            self._pass_start = self._events.get()
            self._pass_start.record(torch.cuda.current_stream(self._device))
        if not self._runs_from_ring(index):
            return self.layers[index]
        if not self._queue or self._queue[0].layer != index:
            self._resync(index)
        use = self._queue[0]
        if index == self._cycle[0]:
            self._passes += 1
        if self._ring.decodes_ahead and use.compute is None:
            self._dequantise(use)
        if self.is_cuda:
            compute = torch.cuda.current_stream(self._device)
            ready = use.compute.ready if use.compute is not None else use.slot.copy_done
            if self.timing:
                e0, e1 = self._events.get(), self._events.get()
                e0.record(compute)
                compute.wait_event(ready)
                e1.record(compute)
                self._pending_wait.append((e0, e1))
            else:
                compute.wait_event(ready)
        if self._ring.decodes_ahead and len(self._queue) > 1 and self._queue[1].compute is None:
            # The next layer dequantises into the other buffer while this one computes.
            self._dequantise(self._queue[1])
        module = use.compute.module if use.compute is not None else use.slot.module
        module.self_attn.layer_idx = index
        return module

    def decoder_layer_done(self, index: int) -> None:
        if index == self.num_layers - 1 and self._pass_start is not None:
            end = self._events.get()
            end.record(torch.cuda.current_stream(self._device))
            self._pending_pass.append((self._pass_start, end))
            self._pass_start = None
        if not self._runs_from_ring(index) or not self._queue or self._queue[0].layer != index:
            return
        use = self._queue.popleft()
        if use.copied:
            self._copies_queued -= 1
        if self.is_cuda:
            done = use.compute if use.compute is not None else use.slot
            done.free.record(torch.cuda.current_stream(self._device))
        self._fill()
        if self.timing:
            self._harvest(block=False)

    @contextlib.contextmanager
    def acoustic_encoder(self) -> Iterator[nn.Module]:
        if not self._loaded:
            self.load()  # the connectors run right after the encoder
        encoder = self.model.model.audio_tower.encoder
        placement = _Placement(self._device)
        placement.place(encoder)
        self._encoder_placement = placement
        try:
            yield encoder
        finally:
            placement.release()  # stream-ordered frees: safe while its kernels are still queued
            self._encoder_placement = None

    @property
    def capturable(self) -> bool:
        return True  # copies and dequantisation are ordered by events outside the layers

    def begin_run(self) -> None:
        if not self._loaded:
            self.load()
        self._arrange(self.plan)  # a run that failed before its end_run left the frames' arrangement
        if self._stats_consumed:
            self.reset_stats()

    def begin_frames(self) -> None:
        """Switch to `plan.in_frames()`: the prompt pass is enqueued and the acoustic encoder
        released, so the VRAM that encoding the voices needed holds `plan.frame_layers` more
        resident layers and `plan.frame_slots` more ring slots until `end_run`."""
        self._arrange(self.plan.in_frames())

    def end_run(self) -> None:
        self._arrange(self.plan)

    def _arrange(self, target: OffloadPlan) -> None:
        """Make `target`'s residency and ring depth the engine's, between passes: for the
        frame extension (once per run, never inside the frame loop) and for
        `set_resident_layers`. One synchronisation and the moved layers' copies; a layer
        that becomes streamed is re-packed in the stream format. The allocator's cached
        blocks go back to the driver before the new buffers are made, so the new buffers
        take the freed memory's place instead of adding to the process's reserved VRAM
        (ComfyUI sets no allocator limit that would force this)."""
        if not self._loaded or target == self._arranged:
            return
        if self.timing:
            self._harvest(block=True)
        try:
            self._drop_ring()
            old, self._arranged = self._arranged, target
            for i in self._order[target.resident_layers : old.resident_layers]:
                self._make_host(i)
                self._reformat_host(i, self.stream_layout.format)  # a no-op for the frames' layers: already streamed
            if self.is_cuda:
                torch.cuda.empty_cache()
            for i in self._order[old.resident_layers : target.resident_layers]:
                self._make_resident(i)
            self._build_ring()
        except BaseException:
            # Some layers moved, no ring: unload (VRAM back now); the next run's load() starts
            # again from the host slabs, which hold every layer whatever failed.
            self._release_device()
            raise

    # --- lifecycle ----------------------------------------------------------------------------

    def _pack(self) -> None:
        """Pack every decoder layer into its host slab (once): resident layers in the model's own
        format, streamed ones in the stream format. Pinning only matters for a CUDA device."""
        pinned = self.plan.pinned and self.is_cuda
        if not self.plan.pinned and self.is_cuda:
            log.warning("pinned=False: streaming from pageable host memory, several times slower than pinned")
        decoded_residents = set() if self.plan.encoded_residents else set(self.plan.resident_indices(self.num_layers))
        for i, layer in enumerate(self.layers):
            if self._host[i] is None:
                layout = self.native if i in decoded_residents else self.stream_layout
                self._host[i] = self._pack_layer(i, layout, pinned)
                # The layer's original tensors, now: glibc would keep their pages until the
                # last layer is packed, and the process would hold the layers twice meanwhile.
                return_freed_memory()

    def _pack_layer(self, i: int, layout: SlabLayout, pinned: bool) -> HostLayer:
        """Layer i in a new slab; a weight the format cannot hold is named with its layer (the
        layer is left as it was: packing encodes every tensor before it releases any)."""
        try:
            return pack_layer(self.layers[i], layout, pinned)
        except PackingError as exc:
            raise PackingError(f"decoder layer {i} {exc}") from exc

    def load(self) -> None:
        """Pack host slabs (first time only), place the resident parts, build the slot ring. Idempotent."""
        if self._loaded:
            return
        self._pack()
        for i in self.plan.streamed_indices(self.num_layers):
            # A layer read back for a residency change whose re-arrangement then failed.
            self._reformat_host(i, self.stream_layout.format)
        try:
            for module in self._resident_modules():
                self._placement.place(module)
            for name in ("latent_scaling_factor", "latent_bias_factor"):
                self._placement.place_tensor(self.model.model, name)
            for i in self.plan.resident_indices(self.num_layers):
                self._make_resident(i)
            self._build_ring()
        except BaseException:
            # Out of memory half way (ComfyUI then counts nothing loaded): what was placed goes back now.
            self._release_device()
            raise
        self._loaded = True
        if self.is_cuda:
            torch.cuda.synchronize(self._device)

    def _make_resident(self, i: int) -> None:
        if self._arranged.encoded_residents:
            self._reformat_host(i, self.stream_layout.format)  # a native slab from when layer i was a decoded resident
            host = self._host[i]
            if self._device.type == "cpu":
                self._resident_buffers[i] = host.slab  # already where it is decoded
            else:
                self._resident_buffers[i] = torch.empty(host.nbytes, dtype=torch.uint8, device=self._device)
                self._resident_buffers[i].copy_(host.slab, non_blocking=True)
            return
        host = self._host[i]
        if self._device.type == "cpu" and host.format == NATIVE:
            point_layer(self.layers[i], self.native, host.slab)  # already where it runs
            return
        buffer = torch.empty(self.native.nbytes, dtype=torch.uint8, device=self._device)
        if host.format == NATIVE:
            buffer[: host.nbytes].copy_(host.slab, non_blocking=True)
        else:
            staging = torch.empty(host.nbytes, dtype=torch.uint8, device=self._device)
            staging.copy_(host.slab, non_blocking=True)
            dequantise(dequant_ops(self.native, host.layout, buffer, staging))
            del staging  # stream-ordered free
        point_layer(self.layers[i], self.native, buffer)
        self._resident_buffers[i] = buffer

    def _make_host(self, i: int) -> None:
        """Drop layer i's device copy (decoded, or an encoded resident's); the module points at
        its host slab again (meta for staged)."""
        self._resident_buffers.pop(i, None)
        host = self._host[i]
        if host.format == NATIVE:
            point_layer(self.layers[i], self.native, host.slab)
        elif not self._arranged.encoded_residents:  # an encoded resident never pointed the module at its buffer
            release_layer(self.layers[i], self.native)

    def _runs_from_ring(self, index: int) -> bool:
        return index in self._from_ring

    def _build_ring(self) -> None:
        arranged = self._arranged
        residents = arranged.resident_indices(self.num_layers)
        self._cycle = list(range(self.num_layers)) if arranged.encoded_residents else list(arranged.streamed_indices(self.num_layers))
        self._from_ring = frozenset(self._cycle)
        self._queue.clear()
        self._copies_queued = 0
        self._next_pos = self._next_slot = self._next_compute = 0
        if not self._cycle:
            return
        fixed = {i: self._resident_buffers[i] for i in residents} if arranged.encoded_residents else None
        self._ring = SlotRing(
            self.layers[0], self.native, self.stream_layout, arranged.ring_slots(self.num_layers), arranged.compute_buffers,
            self._device, fixed,
        )
        if self.is_cuda:
            self._copy_stream = torch.cuda.Stream(self._device)
            if self._ring.decodes_ahead:
                self._dequant_stream = torch.cuda.Stream(self._device)
        self._resync(self._cycle[0])  # prime: the prompt pass's first streamed layers start copying now

    def _drop_ring(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self._device)
        if self._ring is not None:
            self._ring.close()
        self._ring = None
        self._copy_stream = self._dequant_stream = None
        self._queue.clear()
        self._pending_copy.clear()
        self._pending_wait.clear()
        self._pending_pass.clear()
        self._pass_start = None
        self._events = _EventPool()

    def unload(self) -> None:
        """Free every device buffer, stream and event; weights stay in host memory (slabs kept)."""
        if not self._loaded:
            return
        if self.timing:
            self._harvest(block=True)
        self._release_device()

    def _release_device(self) -> None:
        """Everything `load()` and `_arrange` put on the device goes back to the host, from
        whatever state they reached."""
        self._drop_ring()
        self._arranged = self.plan  # unloaded mid-run: the frames' layers are in _resident_buffers too
        for i in list(self._resident_buffers):
            self._make_host(i)
        self._placement.release()
        self._loaded = False
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def close(self) -> None:
        """unload(), then free the host slabs: the model gets ordinary pageable tensors back
        (staged layers come back decoded: packed ones exact, fp8 ones read from `layer_source`,
        or without one with fp8-rounded weights)."""
        self.unload()
        for i, host in enumerate(self._host):
            if host is None:
                continue
            if not (self._reads_exact(host) and self._give_back_read(i)):
                unpack_layer(self.layers[i], host, self.native)
            self._host[i] = None
        gc.collect()
        return_freed_memory()  # the slabs

    def set_resident_layers(self, n: int, encoded_residents: bool | None = None) -> None:
        """Keep `n` decoder layers on the device from the next run on (between runs only). The
        frame extension was planned for the old residency: it is dropped. `encoded_residents`
        (bf16-packed): also switch between packed and decoded residents; a loaded engine
        then unloads and loads again (every device buffer changes)."""
        self._between_runs("set_resident_layers")
        if encoded_residents is not None and encoded_residents != self.plan.encoded_residents:
            loaded = self._loaded
            self.unload()
            self.set_plan(dataclasses.replace(
                self.plan, resident_layers=n, frame_layers=0, frame_slots=0, encoded_residents=encoded_residents,
            ))
            if loaded:
                self.load()
            return
        new_plan = dataclasses.replace(self.plan, resident_layers=n, frame_layers=0, frame_slots=0)
        new_plan.validate(self.num_layers)
        old = self.plan.resident_layers
        self._read_exact(self._order[old:n])
        if self._loaded and n != old:
            self._arrange(new_plan)  # moves the layers between host and device, re-packs, rebuilds the ring
            if self.is_cuda:
                torch.cuda.synchronize(self._device)
                torch.cuda.empty_cache()  # staged layers made resident leave their staging buffers cached
        else:
            for i in self._order[n:old]:
                self._reformat_host(i, self.stream_layout.format)
        self.plan = self._arranged = new_plan
        if n != old:
            return_freed_memory()  # re-packed slabs

    def set_frame_extension(self, frame_layers: int, frame_slots: int) -> None:
        """From the next run on, hold `frame_layers` more resident layers and `frame_slots` more
        ring slots during the frames (`OffloadPlan.frame_layers`; between runs only)."""
        self._between_runs("set_frame_extension")
        plan = dataclasses.replace(self.plan, frame_layers=frame_layers, frame_slots=frame_slots)
        plan.validate(self.num_layers)
        self.plan = self._arranged = plan

    def _between_runs(self, what: str) -> None:
        if self._arranged != self.plan:
            raise RuntimeError(f"{what} between runs only: this engine is generating frames")

    def set_plan(self, plan: OffloadPlan) -> None:
        """Adopt another plan with the same stream dtype (residency, depth, pinning of new slabs,
        embed placement). Only while unloaded."""
        if self._loaded:
            raise RuntimeError("set_plan needs an unloaded engine: call unload() first")
        if plan.stream_dtype != self.plan.stream_dtype:
            raise ValueError("set_plan cannot change the stream dtype: close() this engine and build a new one")
        plan.validate(self.num_layers)
        self.set_resident_layers(plan.resident_layers)
        self.plan = self._arranged = plan

    def _reads_exact(self, host: HostLayer | None) -> bool:
        return host is not None and host.format == FP8 and self._layer_source is not None

    def _read_exact(self, layers: list[int]) -> None:
        """`layers`, about to become resident, get native slabs of the checkpoint's weights in
        place of their rounded fp8 ones, where `layer_source` can read them. If one cannot be
        read, those already read go back to fp8 (quantised from the same weights: the same
        bytes) and nothing has changed. Not for the frame extension's layers: they run as
        streamed, rounded, and go back to the ring."""
        layers = [i for i in layers if self._reads_exact(self._host[i])]
        if layers and self._loaded and self.is_cuda:
            torch.cuda.synchronize(self._device)  # the ring may still be prefetching from the slabs replaced here
        done: list[int] = []
        try:
            for i in layers:
                assign_layer(self.layers[i], self.native, self._layer_source(i))
                self._host[i] = self._pack_layer(i, self.native, self._host[i].pinned)
                done.append(i)
        except BaseException:
            for i in done:
                self._reformat_host(i, self.stream_layout.format)
            raise

    def _give_back_read(self, i: int) -> bool:
        """close(): layer i gets the checkpoint's weights. A closing engine must not fail half
        way, so a source that cannot read them (the folder moved) leaves it rounded, with a warning."""
        try:
            assign_layer(self.layers[i], self.native, self._layer_source(i))
        except Exception as exc:  # noqa: BLE001 - any reader failure: fall back, say why
            log.warning("decoder layer %d keeps its fp8-rounded weights: reading it back failed (%s)", i, exc)
            return False
        return True

    def _reformat_host(self, i: int, fmt: str) -> None:
        """A streamed layer's slab must be in the stream format: re-pack a native slab in the
        staged format. (A resident layer keeps whatever slab it has: a staged slab is
        decoded on upload.)"""
        host = self._host[i]
        if host is None or fmt == NATIVE or host.format == fmt:
            return
        point_layer(self.layers[i], self.native, host.slab)
        self._host[i] = self._pack_layer(i, self.stream_layout, host.pinned)
        del host

    # --- the ring -----------------------------------------------------------------------------

    def _resync(self, index: int) -> None:
        """Restart the cyclic copy order at streamed layer `index` (first use, or an aborted pass).
        Copies still in flight are harmless: the copy stream runs in order."""
        self._queue.clear()
        if self.is_cuda:
            # An aborted pass may have left a layer computing without its "free" record:
            # order every buffer's reuse after all compute enqueued so far.
            compute = torch.cuda.current_stream(self._device)
            for buffer in self._ring.computes if self._ring.decodes_ahead else self._ring.slots:
                buffer.free.record(compute)
        self._next_pos = self._cycle.index(index)
        self._copies_queued = 0
        self._fill()

    def _fill(self) -> None:
        """Queue the coming uses in cyclic order until the ring's slots all hold a copy in
        flight and the next layer needs one: an encoded resident's use costs no slot, and
        at least two uses are queued (the next layer's decoding can start early)."""
        while True:
            layer = self._cycle[self._next_pos]
            fixed = self._ring.fixed.get(layer)
            ring_full = self._copies_queued == len(self._ring)
            if ring_full and (fixed is None or len(self._queue) >= 2):
                return
            self._next_pos = (self._next_pos + 1) % len(self._cycle)
            if fixed is None:
                self._issue_copy(layer)
            else:
                self._queue.append(_Use(layer, fixed, copied=False))

    def _issue_copy(self, layer: int) -> None:
        ring = self._ring
        slot = ring.slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(ring)
        host = self._host[layer]
        dst = slot.buffer[: host.nbytes]
        if self.is_cuda:
            stream = self._copy_stream
            stream.wait_event(slot.free)
            with torch.cuda.stream(stream):
                if self.timing:
                    e0, e1 = self._events.get(), self._events.get()
                    e0.record(stream)
                    dst.copy_(host.slab, non_blocking=True)
                    e1.record(stream)
                    self._pending_copy.append((e0, e1))
                else:
                    dst.copy_(host.slab, non_blocking=True)
                slot.copy_done.record(stream)
        else:
            dst.copy_(host.slab)
        self._copies += 1
        self._bytes += host.nbytes
        self._copies_queued += 1
        self._queue.append(_Use(layer, slot))

    def _dequantise(self, use: _Use) -> None:
        """Decoded ahead: enqueue the decoding of `use`'s staging slot into the next compute buffer,
        after its copy and after the compute stream is done with that buffer's last layer."""
        ring = self._ring
        index = self._next_compute
        compute = ring.computes[index]
        self._next_compute = (self._next_compute + 1) % len(ring.computes)
        if self.is_cuda:
            stream = self._dequant_stream
            stream.wait_event(use.slot.copy_done)
            stream.wait_event(compute.free)
            with torch.cuda.stream(stream):
                ring.dequantise(index, use.slot)
            use.slot.free.record(stream)
            compute.ready.record(stream)
        else:
            ring.dequantise(index, use.slot)
        use.compute = compute

    # --- statistics ---------------------------------------------------------------------------

    def reset_stats(self) -> None:
        if self.timing:
            self._harvest(block=True)
        self._copies = 0
        self._bytes = 0
        self._copy_ms = 0.0
        self._wait_ms = 0.0
        self._pass_ms = []
        self._passes = 0
        self._stats_consumed = False

    def _harvest(self, block: bool) -> None:
        if block and self.is_cuda and (self._pending_copy or self._pending_wait or self._pending_pass):
            torch.cuda.synchronize(self._device)
        for pending, add in (
            (self._pending_copy, self._add_copy_ms),
            (self._pending_wait, self._add_wait_ms),
            (self._pending_pass, self._pass_ms.append),
        ):
            while pending and (block or pending[0][1].query()):
                e0, e1 = pending.popleft()
                add(e0.elapsed_time(e1))
                self._events.put(e0, e1)

    def _add_copy_ms(self, ms: float) -> None:
        self._copy_ms += ms

    def _add_wait_ms(self, ms: float) -> None:
        self._wait_ms += ms

    def stats(self) -> dict[str, Any]:
        """Offload statistics since the run began (reset by the next run's `begin_run`).
        Synchronises the device: call it after a run, not inside one."""
        if self.timing:
            self._harvest(block=True)
        self._stats_consumed = True
        streamed = self.num_layers - (self._arranged if self._loaded else self.plan).resident_layers
        frames = self.plan.in_frames()
        out: dict[str, Any] = {
            "offload_resident_layers": self.plan.resident_layers,
            "offload_frame_resident_layers": frames.resident_layers,
            "offload_frame_prefetch_depth": frames.ring_slots(self.num_layers),
            "offload_streamed_layers": streamed,
            "offload_stream_dtype": self.plan.stream_dtype,
            "offload_encoded_residents": self.plan.encoded_residents,
            "offload_pinned": all(self._host[i] is not None and self._host[i].pinned for i in self.plan.streamed_indices(self.num_layers)),
            "offload_copies": self._copies,
            "offload_bytes_streamed": self._bytes,
            "offload_passes": self._passes,
            "offload_layers_per_pass": self._copies / self._passes if self._passes else 0.0,
            "offload_resident_bytes": self.resident_bytes,
            "offload_host_bytes": self.host_bytes,
        }
        if self.timing:
            # GPU time from the first decoder layer's start to the last one's end, median over
            # the passes: with everything resident, the part of T_resident the ring overlaps.
            out["offload_decoder_pass_ms"] = statistics.median(self._pass_ms) if self._pass_ms else 0.0
            out["offload_copy_ms"] = self._copy_ms
            out["offload_wait_ms"] = self._wait_ms
            out["offload_link_gbps"] = self._bytes / (self._copy_ms * 1e6) if self._copy_ms > 0 else 0.0
        return out

    # --- accounting -----------------------------------------------------------------------------

    def _resident_modules(self) -> list[nn.Module]:
        core = self.model.model
        modules = [
            self.lm.norm, self.lm.rotary_emb, core.diffusion_head, core.audio_tower.decoder,
            core.semantic_tokenizer_encoder, core.multi_modal_projector, core.semantic_connector,
        ]
        if not self.plan.embed_on_host:
            modules.append(self.lm.embed_tokens)
        return modules

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights on the device now: the resident modules and decoder layers, the slot
        buffers (and the acoustic encoder while a prompt is encoded). Counted from the tensors'
        own devices, so a CPU engine accounts the same way as a GPU one."""
        if not self._loaded:
            return 0
        modules = self._resident_modules()
        if self._encoder_placement is not None:
            modules.append(self.model.model.audio_tower.encoder)
        seen: set[int] = set()
        total = 0
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        tensors += [getattr(self.model.model, n) for n in ("latent_scaling_factor", "latent_bias_factor")]
        for t in tensors:
            if id(t) not in seen and t.device == self._device:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        total += self._arranged.resident_layers * self._resident_layer_nbytes(self._arranged)
        if self._ring is not None:
            total += self._ring.nbytes
        return total

    def _resident_layer_nbytes(self, plan: OffloadPlan) -> int:
        return self.stream_layout.nbytes if plan.encoded_residents else self.native.nbytes

    def resident_bytes_for(self, resident_layers: int, encoded_residents: bool | None = None) -> int:
        """`resident_bytes` after `set_resident_layers(resident_layers, encoded_residents)` and
        `load()`, computed without moving anything (ComfyUI asks this before it grants or
        takes VRAM)."""
        plan = dataclasses.replace(self.plan, resident_layers=resident_layers)
        if encoded_residents is not None:
            plan = dataclasses.replace(plan, encoded_residents=encoded_residents)
        fixed = {id(t): t for m in self._resident_modules() for t in (*m.parameters(), *m.buffers())}
        core = self.model.model
        fixed.update({id(t): t for t in (core.latent_scaling_factor, core.latent_bias_factor)})
        staged = self.stream_layout.nbytes if plan.staged else None
        return (
            sum(t.numel() * t.element_size() for t in fixed.values())
            + resident_layers * self._resident_layer_nbytes(plan)
            + ring_nbytes(
                self.native.nbytes, staged, plan.ring_slots(self.num_layers), plan.compute_buffers, plan.encoded_residents,
                weight_buffer_nbytes(self.native, self.stream_layout),
            )
        )

    @property
    def slot_bytes(self) -> int:
        return self._ring.nbytes if self._ring is not None else 0

    @property
    def host_bytes(self) -> int:
        """Bytes of the host slabs (the decoder layers' host copy)."""
        return sum(h.nbytes for h in self._host if h is not None)

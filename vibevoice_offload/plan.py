"""The offload plan: the contract between the VRAM planner and the offload engine.

The planner decides, the engine executes; neither needs the other's code, only this
dataclass. Keep it small and free of policy.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, get_args

StreamDtype = Literal["bf16", "bf16-packed", "fp8"]
STREAM_DTYPES: tuple[str, ...] = get_args(StreamDtype)


@functools.cache
def residency_order(num_layers: int, stream_dtype: str = "bf16") -> tuple[int, ...]:
    """The order in which decoder layers become resident: with R resident, the first R.
    Every prefix contains the shorter ones: the frame extension and ComfyUI only ever add
    or drop layers at its end.

    Lossless stream dtypes spread the residents over the pass: while no streamed layer runs
    (the rest of the frame, and resident layers next to it) a ring of S slots can only get
    S copies ahead, and the link then idles; a resident layer between two streamed ones
    costs the link nothing. So the inner layers come in van der Corput order (the middle,
    then the quarters, then the eighths, ...: every prefix evenly spread), then the first
    and the last layer, which border the rest of the frame.

    fp8 keeps the first layers resident instead: it rounds what it streams, and rounding
    early compounds through every later layer (on the synthetic 8-layer GPU test model with
    2 layers resident: 7.6% relative error with layers 0-1 exact, 30% with layers 2 and 4)."""
    if stream_dtype == "fp8":
        return tuple(range(num_layers))
    inner = range(1, num_layers - 1)
    order: list[int] = []
    n = 1
    while len(order) < len(inner):
        position, fraction, bits = 0.0, 0.5, n
        while bits:  # n's binary digits mirrored behind the point: 1/2, 1/4, 3/4, 1/8, ...
            position += fraction * (bits & 1)
            bits, fraction = bits >> 1, fraction / 2
        layer = 1 + int(position * len(inner))
        if layer not in order:
            order.append(layer)
        n += 1
    return tuple(order) + tuple(dict.fromkeys((0, num_layers - 1)))[: num_layers - len(order)]


@dataclass(frozen=True)
class OffloadPlan:
    """Where the decoder layers live while VibeVoice generates.

    `resident_layers` decoder layers stay on the GPU, the first of `residency_order`; the
    rest are streamed from host memory through a ring of `prefetch_depth` GPU slots, once
    per frame.
    """

    resident_layers: int
    """Decoder layers kept on the GPU; `num_layers - resident_layers` are streamed."""

    stream_dtype: StreamDtype
    """How streamed layers are stored on the host and cross the link. "bf16": in the model
    dtype, as loaded. "bf16-packed": the same bits, the `nn.Linear` weights in the lossless
    12-bit format of `bf16_packing` (3/4 of the bytes; a bf16 model, and Triton on CUDA).
    "fp8": the `nn.Linear` weights as `torch.float8_e4m3fn` with one float32 scale per
    output channel (row; half the bytes, rounded). Norms and biases stay in the model dtype.
    The two encoded formats are "staged": the engine decodes their weights into the model
    dtype on the GPU (`compute_buffers`)."""

    prefetch_depth: int = 2
    """GPU slots in the ring: one being computed, the others being filled (>= 2)."""

    pinned: bool = True
    """Stream from page-locked host slabs (about 7x faster than pageable copies)."""

    embed_on_host: bool = False
    """Keep `embed_tokens` on the host; it is only read for the prompt and a few ids."""

    frame_layers: int = 0
    """Decoder layers made resident for the frames only: after the prompt pass the engine
    copies the next `frame_layers` layers of `residency_order` to the GPU, into the
    VRAM that encoding the voice prompts needed (the acoustic encoder and its activations,
    free again by then), and frees them when the run ends."""

    frame_slots: int = 0
    """Slots added to the ring for the frames only, in that same VRAM: a deeper ring keeps
    the link busy through the part of the frame that has no streamed layer."""

    compute_buffers: int = 2
    """Staged streaming only: how staged layers are decoded into the model dtype.
    2: into two layer-sized buffers, a layer ahead: the next layer's decoding may run while
    the current one waits or computes (it takes turns with the layers on the GPU).
    1: on use, each weight just before its matmul, into one buffer the size of the largest
    weight (`gpu_slots.DecodedLinear`): the same GPU work, decoded only once the previous
    layer ran, for two layers less of VRAM (less a weight: Large 0.80 GB)."""

    encoded_residents: bool = False
    """bf16-packed only: the resident layers stay on the GPU packed, as they stream, and are
    decoded before each use like the streamed ones. A resident
    layer then costs 0.76x the VRAM for the same bits, so a budget holds about a third
    more of them, for 28 decodings a frame (Large: 0.46 ms of GPU time each) where the
    frame waits on the link anyway. (fp8 residents would be rounded: not offered.)"""

    @property
    def staged(self) -> bool:
        """Streamed layers are decoded on the GPU (fp8, bf16-packed), not run from their slot."""
        return self.stream_dtype != "bf16"

    def resident_indices(self, num_layers: int) -> tuple[int, ...]:
        """The resident decoder layers, in the order they became resident."""
        return residency_order(num_layers, self.stream_dtype)[: self.resident_layers]

    def streamed_indices(self, num_layers: int) -> tuple[int, ...]:
        """The streamed decoder layers, in pass order."""
        resident = set(self.resident_indices(num_layers))
        return tuple(i for i in range(num_layers) if i not in resident)

    def decoded_indices(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose weights are decoded before each use, in pass order:
        the streamed ones of a staged format, and with `encoded_residents` every layer."""
        if not self.staged:
            return ()
        return tuple(range(num_layers)) if self.encoded_residents else self.streamed_indices(num_layers)

    def ring_slots(self, num_layers: int) -> int:
        """The slots of the engine's ring: `prefetch_depth`, but no more than the layers to
        stream (a slot that no copy could fill is not built)."""
        return min(self.prefetch_depth, num_layers - self.resident_layers)

    def in_frames(self) -> "OffloadPlan":
        """The residency and ring in effect while frames are generated (the plan itself
        during the prompt pass and between runs)."""
        return dataclasses.replace(
            self, resident_layers=self.resident_layers + self.frame_layers,
            prefetch_depth=self.prefetch_depth + self.frame_slots, frame_layers=0, frame_slots=0,
        )

    def validate(self, num_layers: int) -> None:
        """Raise `ValueError` naming the first field that the engine cannot execute."""
        if isinstance(self.resident_layers, bool) or not isinstance(self.resident_layers, int):
            raise ValueError(f"resident_layers must be an int, got {self.resident_layers!r}")
        if not 0 <= self.resident_layers <= num_layers:
            raise ValueError(
                f"resident_layers={self.resident_layers} is outside 0..{num_layers} "
                f"(the model has {num_layers} decoder layers)"
            )
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"stream_dtype must be one of {STREAM_DTYPES}, got {self.stream_dtype!r}")
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 2:
            raise ValueError(f"prefetch_depth must be an int >= 2 (one slot computing, one filling), got {self.prefetch_depth!r}")
        if not isinstance(self.pinned, bool):
            raise ValueError(f"pinned must be a bool, got {self.pinned!r}")
        if not isinstance(self.embed_on_host, bool):
            raise ValueError(f"embed_on_host must be a bool, got {self.embed_on_host!r}")
        for name in ("frame_layers", "frame_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.compute_buffers not in (1, 2) or isinstance(self.compute_buffers, bool):
            raise ValueError(f"compute_buffers must be 1 or 2, got {self.compute_buffers!r}")
        if not isinstance(self.encoded_residents, bool):
            raise ValueError(f"encoded_residents must be a bool, got {self.encoded_residents!r}")
        if self.encoded_residents and self.stream_dtype != "bf16-packed":
            raise ValueError(f"encoded_residents needs stream_dtype 'bf16-packed' (lossless); {self.stream_dtype!r} residents stay in the model dtype")
        if self.resident_layers + self.frame_layers > num_layers:
            raise ValueError(
                f"resident_layers + frame_layers = {self.resident_layers + self.frame_layers} is more than the "
                f"model's {num_layers} decoder layers"
            )

"""The layer offloader: decoder layers streamed from exact-size pinned host slabs through a
fixed ring of GPU slots, ordered with CUDA events (see docs/OFFLOADING.md)."""

from .engine import OffloadEngine
from .gpu_slots import SlotRing
from .host_slabs import HostLayer, SlabLayout

__all__ = ["HostLayer", "OffloadEngine", "SlabLayout", "SlotRing"]

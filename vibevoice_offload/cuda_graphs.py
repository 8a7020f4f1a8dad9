"""CUDA graphs captured into one memory pool of their own, freed together.

Each small kernel launched from Python costs the host ~10 us, and a frame had ~5,000 of
them, so the host, not the GPU, set the frame time. So the speech half of a frame
(speech_frame.py), each decoder layer's step (decoder_pass.py) and each fp8 layer's
dequantisation (offload/gpu_slots.py) are captured once and replayed.

A pool's graphs replay one after another, in stream order, so their temporaries may share
memory; what a graph returns must therefore be copied out of the pool before another graph
of the pool replays (the speech graph writes its outputs into buffers of its own).
Releasing the pool hands exactly its blocks back to the driver: graphs captured into
throwaway private pools would leave each finished run's pool reserved until someone
empties the whole cache.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# RuntimeError subclasses that a failed capture must not hide behind an eager fallback.
_NOT_CAPTURE_ERRORS = tuple(e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e is not None)


@functools.cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One capture stream per device for the process, as torch.cuda.graph keeps: cuBLAS
    allocates a workspace (32 MiB on Hopper) for every stream it runs on and keeps it."""
    return torch.cuda.Stream(device)


class GraphPool:
    """Captures graphs on `device` into one pool; `release()` frees them and their memory."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        # "cuda" and "cuda:0" must share one capture stream (and its cuBLAS workspace).
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self._pool: torch.cuda.MemPool | None = torch.cuda.MemPool()
        self._graphs: list[torch.cuda.CUDAGraph] = []

    def capture(self, compute: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T] | None:
        """Capture `compute` (nothing runs: replay the graph to run it). Returns the graph and
        `compute`'s outputs (tensors in the pool, rewritten by every replay), or None if an
        op cannot be captured: the caller then stays eager, still correct."""
        graph, stream = torch.cuda.CUDAGraph(), _capture_stream(self.device)
        # capture_begin/end on a stream of our own (capture cannot use the default stream)
        # rather than `torch.cuda.graph`, which also synchronises, empties the cache and may
        # run a full garbage collection (0.3 s per capture with a model loaded).
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                # thread_local: ComfyUI's server threads may query the GPU while we capture.
                graph.capture_begin(pool=self._pool.id, capture_error_mode="thread_local")
                try:
                    outputs = compute()
                finally:
                    graph.capture_end()
        except _NOT_CAPTURE_ERRORS:
            raise  # out of memory or a broken device: not something eager execution avoids
        except RuntimeError as error:
            log.warning("CUDA graph capture failed, running eagerly: %s", error)
            return None
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graphs.append(graph)
        return graph, outputs

    def drop(self, graphs: Iterable[torch.cuda.CUDAGraph]) -> None:
        """Free graphs that will not be replayed again. One still running is freed by CUDA
        when its work ends; its temporaries stay in the pool, which outlives it."""
        for graph in list(graphs):
            graph.reset()
            self._graphs.remove(graph)

    def release(self) -> None:
        """Free every graph, then the pool (its blocks go back to the driver). Tensors returned
        by `capture` must be dropped first: a live block keeps its segment."""
        torch.cuda.synchronize(self.device)  # no replay may still be running
        for graph in self._graphs:
            graph.reset()
        self._graphs.clear()
        self._pool = None

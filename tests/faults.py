"""Faults injected into an OffloadEngine, for the tests of its failure paths (CPU and GPU)."""

from __future__ import annotations

import torch

from vibevoice_offload.offload import OffloadEngine


def out_of_memory_on_call(engine: OffloadEngine, call: int) -> list[int]:
    """Make the engine's `call`-th ring build (1: load's, after the resident parts were
    placed; 2: the frame extension's, half of its layers moved) fail as if the device were
    full; returns the list of calls seen so far (filled as they happen)."""
    calls: list[int] = []
    build = engine._build_ring

    def build_or_fail() -> None:
        calls.append(len(calls) + 1)
        if len(calls) == call:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        build()

    engine._build_ring = build_or_fail
    return calls

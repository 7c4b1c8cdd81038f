"""Wall time of a block on a device: synchronized before and after on a GPU (CUDA kernels run
asynchronously), so the seconds are the work's, not its launch's. The pipeline's per-stage timings and
the benchmark's stages use the same clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: dict[str, float], stage: str) -> Iterator[None]:
    """Wall time of the block, synchronized on a GPU, added to into[stage]."""
    synchronize(device)
    t0 = time.perf_counter()
    yield
    synchronize(device)
    into[stage] = into.get(stage, 0.0) + time.perf_counter() - t0

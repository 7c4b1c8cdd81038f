"""Clocks and meters of the benchmark: per-call timing (CUDA events on a GPU), stage timing,
peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on GPU), the memory in use now,
the age of this process (deadlines count its imports and the model build), median and p90."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..clock import synchronize


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements in seconds."""

    median: float
    p90: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median, "p90_s": self.p90, "n": self.n}


def summarize(samples: list[float]) -> Stats | None:
    """Median and 90th percentile (linear interpolation) of `samples`; None when there are none."""
    if not samples:
        return None
    a = np.asarray(samples, dtype=np.float64)
    return Stats(median=float(np.median(a)), p90=float(np.percentile(a, 90)), n=len(samples))


class CallClock:
    """Times each call between tic() and toc(): CUDA events on a GPU (no sync per call), else perf_counter.

    drain() returns the durations (seconds) recorded since the last drain, synchronizing once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._open: object = None
        self._pending: list[tuple[object, object]] = []

    def tic(self) -> None:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open = ev
        else:
            self._open = time.perf_counter()

    def toc(self) -> None:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pending.append((self._open, ev))
        else:
            self._pending.append((self._open, time.perf_counter()))
        self._open = None

    def drain(self) -> list[float]:
        if self._cuda:
            synchronize(self.device)
            out = [start.elapsed_time(end) / 1000.0 for start, end in self._pending]  # type: ignore[attr-defined]
        else:
            out = [float(end) - float(start) for start, end in self._pending]  # type: ignore[arg-type]
        self._pending = []
        return out


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0.0 where that cannot be read): a deadline given
    to a fresh process then counts its interpreter start, imports and model build too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" that ends the name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc/self/statm; no psutil, which the GPU image lacks)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: torch.cuda.memory_allocated on a GPU, else the process RSS."""
    if device.type == "cuda":
        synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return rss_bytes()


class PeakMemory:
    """Peak memory while a block runs: torch.cuda.max_memory_allocated on a GPU, else the process RSS
    sampled every `interval` seconds by a thread. Both count the whole process (shared weights, every
    loaded contestant); the runner subtracts what was in use before a contestant opened."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss"

    @contextmanager
    def measure(self, into: list[int]) -> Iterator[None]:
        """Append the peak (bytes) of the block to `into`."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            synchronize(self.device)
            into.append(int(torch.cuda.max_memory_allocated(self.device)))
            return
        peak = [rss_bytes()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], rss_bytes())

        thread = threading.Thread(target=sample, name="bench-rss", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], rss_bytes())
            into.append(int(peak[0]))

"""One benchmark run's state and what both schedules do with it (bench/interleaved.py, bench/sequential.py):
the config, the entries, open a contestant, a timed edit, quality against the reference, free, isolation.
Memory: a contestant's peak is what it used above what was in use before it opened (the shared weights
and the reference are not its own); its own weights (an FP8 copy, a fused QKV) are reported apart.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image

from ..backends.torch import default_dtype, dtype_name
from ..buckets import ShapeKey
from ..config import DEFAULT_GUIDANCE, DEFAULT_PROMPT
from ..errors import ConfigError, KontextError
from ..model.components import Components
from ..request import EditRequest
from .contestants import (
    Contestant,
    EditRunner,
    RunSample,
    open_runner,
)
from .isolation import changed, fingerprint
from .quality import Golden, Quality, measure_quality, record_golden
from .timing import PeakMemory, memory_in_use, summarize

log = logging.getLogger(__name__)

SCHEDULES = ("interleaved", "sequential")


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark. None fields take the defaults documented on each."""

    model: str = "tiny"  # preset name or local path
    steps: int = 4
    repeats: int = 3  # timed rounds per bucket
    warmup: int = 1  # discarded rounds per bucket
    buckets: tuple[tuple[int, int], ...] | None = None  # None: the family's square and two extreme aspects
    contestants: tuple[str, ...] | None = None  # None: diffusers, torch-eager, engines (+compile, fp8 on GPU)
    build_dir: Path | None = None  # None: build/<model>
    device: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    image: Path | None = None  # None: the bundled sample
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    progress: bool = True
    schedule: str = "interleaved"  # or "sequential" (see the module doc)
    deadline_s: float | None = None  # sequential only: seconds from PROCESS START; contestants past it skip
    profile: tuple[str, ...] = ()  # contestants whose one step is profiled (torch.profiler, CUDA)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.deadline_s is not None and self.schedule != "sequential":
            raise ConfigError("a deadline needs the sequential schedule (contestants are skipped whole)")

    @property
    def dtype(self) -> torch.dtype:
        """fp32 on CPU (the reference precision), bf16 on a GPU."""
        return default_dtype(self.device)


@dataclass
class Entry:
    """Everything measured for one contestant on one bucket."""

    contestant: Contestant
    bucket: tuple[int, int]
    shape_key: ShapeKey
    samples: list[RunSample] = field(default_factory=list)
    peak_memory: list[int] = field(default_factory=list)
    quality: Quality | None = None
    skipped: str | None = None  # why nothing was measured
    first_edit_s: float | None = (
        None  # the first (warm-up) edit end to end: compiles and captures happen here
    )
    load_s: float | None = None  # opening the contestant (copy, quantize, calibrate); first bucket only
    profile: str | None = None  # torch.profiler's top kernels of one step, when asked for
    memory_base: int = 0  # bytes in use before the contestant opened: subtracted from its peaks
    weights_bytes: int | None = None  # what opening it added (its own weights: FP8 copy, fused QKV)
    dynamo: dict[str, int] | None = None  # graphs, graph breaks, recompiles while it ran


@dataclass
class BenchRun:
    """The outcome of run_bench: the setup, the entries, and whatever could not run."""

    config: BenchConfig
    components: Components
    device: torch.device
    started: datetime
    buckets: tuple[tuple[int, int], ...]
    contestants: list[Contestant]
    load_seconds: dict[str, float]
    entries: list[Entry]
    memory_kind: str
    notes: list[str] = field(default_factory=list)
    isolation: dict[str, str] = field(default_factory=dict)  # contestant -> "ok" or what it changed
    weights_bytes: dict[str, int] = field(default_factory=dict)  # contestant -> memory its opening added
    finished: bool = False


Progress = Callable[[BenchRun], None]


@dataclass(frozen=True)
class Case:
    """One bucket of the run: its input image, settings and shape key."""

    bucket: tuple[int, int]
    image: Image.Image
    settings: EditRequest  # its image and prompt: the case's (contestants replace the prompt per round)
    key: ShapeKey


def case_golden(run: BenchRun, case: Case) -> Golden:
    name = f"torch-eager-{dtype_name(run.config.dtype)}"
    return record_golden(
        run.components, run.device, run.config.dtype, case.image, run.config.prompt, case.settings, name
    )


def open_contestant(run: BenchRun, contestant: Contestant, entries: list[Entry]) -> EditRunner | None:
    """Open one contestant, timing it and what it added to memory; on any exception its entries say why
    it was skipped and None is returned (a contestant that cannot open never ends the run)."""
    t0 = time.perf_counter()
    before = memory_in_use(run.device)
    try:
        runner = open_runner(contestant, run.components, run.device, run.config.dtype)
    except Exception as e:
        why = f"not loaded: {e}" if isinstance(e, KontextError) else f"failed to open: {failure(e)}"
        run.notes.append(f"{contestant.name} {why}")
        log.warning("%s %s", contestant.name, why, exc_info=not isinstance(e, KontextError))
        for entry in entries:
            entry.skipped = why
        free_memory(run.device)
        return None
    seconds = time.perf_counter() - t0
    run.load_seconds[contestant.name] = seconds
    run.weights_bytes[contestant.name] = max(memory_in_use(run.device) - before, 0)
    if entries:
        entries[0].load_s = seconds
    for entry in entries:
        entry.weights_bytes = run.weights_bytes[contestant.name]
    return runner


def failure(e: BaseException, limit: int = 400) -> str:
    """'RuntimeError: what it said', one line, at most `limit` characters: an entry's reason."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def free_memory(device: torch.device) -> None:
    """Drop a closed contestant's modules and compiled code, so the next one starts cold (inductor's
    on-disk cache still turns graphs an earlier contestant compiled into hits: see the report's note)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_isolation(run: BenchRun, after: str, before: dict[str, tuple[object, ...]]) -> None:
    """The baseline's (and reference's) transformer must be exactly as it was before `after` ran."""
    diff = changed(before, fingerprint(run.components.transformer))
    verdict = "ok" if not diff else f"changed {len(diff)} tensors of the baseline, first {diff[0]}"
    run.isolation[after] = verdict
    if diff:
        run.notes.append(f"ISOLATION BROKEN after {after}: {verdict}")
        log.error("isolation broken after %s: %s", after, verdict)


def serves(runner: EditRunner, key: ShapeKey, entry: Entry) -> bool:
    keys = runner.replay_denoiser.shape_keys
    if keys is not None and key not in keys:
        entry.skipped = f"shape {key} not served by this artifact"
        return False
    return True


def measure(
    entry: Entry, runner: EditRunner, golden: Golden, run: BenchRun, steps: int | None = None
) -> None:
    """The entry's quality against the reference; a replay that raises is noted, never fatal."""
    if not entry.samples or entry.skipped:
        return
    replay = None if runner.replay_is_reference else runner.replay_denoiser
    try:
        entry.quality = measure_quality(replay, entry.samples[-1].image, golden, steps)
    except Exception as e:
        run.notes.append(f"{entry.contestant.name}: quality replay failed: {failure(e)}")
        log.warning("%s: quality replay failed", entry.contestant.name, exc_info=True)


def timed_run(
    runner: EditRunner, case: Case, prompt: str, entry: Entry, meter: PeakMemory, keep: bool
) -> float | None:
    """One edit: its sample and peak (above entry.memory_base) kept when `keep`; its wall seconds, or None
    when it raised (the entry then says why: any exception, a contestant's failure is its own result)."""
    peaks: list[int] = []
    t0 = time.perf_counter()
    try:
        with meter.measure(peaks):
            sample = runner.run(case.image, prompt, case.settings)
    except Exception as e:
        entry.skipped = f"failed: {failure(e)}"
        log.warning(
            "%s failed on %dx%d: %s",
            runner.contestant.name,
            *entry.bucket,
            entry.skipped,
            exc_info=not isinstance(e, KontextError),
        )
        return None
    seconds = time.perf_counter() - t0
    if entry.first_edit_s is None:
        entry.first_edit_s = seconds
    if keep:
        entry.samples.append(sample)
        entry.peak_memory.extend(max(p - entry.memory_base, 0) for p in peaks)
    return seconds


def profile_step(runner: EditRunner, golden: Golden, top: int = 25) -> str:
    """torch.profiler over one transformer step (the reference's middle step): the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    call = golden.calls[len(golden.calls) // 2]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        runner.replay_denoiser(**call.inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort, row_limit=top))


def median_total(entry: Entry) -> float | None:
    """The median end-to-end seconds of an entry's timed edits."""
    stats = summarize([s.stages["total"] for s in entry.samples if "total" in s.stages])
    return stats.median if stats else None

"""`kontext bench`: every contestant on the same weights, inputs and seeds; the config, the entries,
contestant selection and what each schedule shares (open, timed edit, quality, free, isolation).

Two schedules: interleaved (the default, interleaved.py: every contestant loaded, rounds rotated) and
sequential (GPU runs of the 12B model, sequential.py: one contestant at a time, a deadline counted from
the start of the process). In both, any exception of one contestant is its result, never the run's end.
Quality: one recorded reference edit per bucket (torch eager) and each contestant's replay of its steps.
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
from PIL import Image, ImageOps

from ..backends.torch import default_dtype, dtype_name
from ..buckets import ShapeKey, buckets, shape_key
from ..config import DEFAULT_GUIDANCE, DEFAULT_PROMPT
from ..errors import ConfigError, KontextError
from ..images import load_image
from ..model.components import Components
from ..model.load import load_components
from ..request import EditRequest
from .contestants import (
    BASELINE,
    ENGINES,
    TORCH_PREFIX,
    Contestant,
    EditRunner,
    RunSample,
    engine_contestants,
    open_runner,
    torch_contestant,
)
from .isolation import changed, fingerprint
from .machine import cpu_has_bf16
from .quality import Quality, Reference, measure_quality, record_reference
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


def default_buckets(family: str) -> tuple[tuple[int, int], ...]:
    """The family's square bucket (nearest to 1:1) and its two extreme aspect ratios."""
    bs = buckets(family)
    square = min(bs, key=lambda b: abs(b[0] / b[1] - 1.0))
    return tuple(dict.fromkeys((square, bs[0], bs[-1])))


def check_buckets(requested: tuple[tuple[int, int], ...], family: str) -> tuple[tuple[int, int], ...]:
    allowed = buckets(family)
    for b in requested:
        if b not in allowed:
            sizes = ", ".join(f"{w}x{h}" for w, h in allowed)
            raise ConfigError(f"bucket {b[0]}x{b[1]} is not in the model's family {family!r}: {sizes}")
    return requested


def select_contestants(
    names: tuple[str, ...] | None,
    components: Components,
    device: torch.device,
    dtype: torch.dtype,
    build_dir: Path,
    notes: list[str],
) -> list[Contestant]:
    """Resolve contestant names: 'diffusers', torch-{eager|compile|fp8}[+lever...] (backends.torch.LEVERS),
    'engines' (all artifacts of the manifest) or one artifact's name such as 'onnxruntime-int8'."""
    if names is None:
        names = default_contestants(device)
    out: list[Contestant] = []
    engines: list[Contestant] | None = None
    for name in names:
        if name == BASELINE:
            out.append(Contestant(BASELINE, "diffusers", dtype_name(dtype)))
        elif name.startswith(TORCH_PREFIX):
            out.append(torch_contestant(name, components, device, dtype))
        else:
            if engines is None:
                engines = _engines_or_note(build_dir, components, device, notes, name)
            chosen = [c for c in engines if name in (ENGINES, c.name)]
            if not chosen and name != ENGINES:
                have = ", ".join(c.name for c in engines) or "none"
                raise ConfigError(
                    f"unknown contestant {name!r}: not diffusers, torch-<mode>[+lever...], "
                    f"engines, nor an artifact of {build_dir} (have: {have})"
                )
            out.extend(chosen)
    return list({c.name: c for c in out}.values())


def default_contestants(device: torch.device, bf16_cpu: bool | None = None) -> tuple[str, ...]:
    """diffusers, torch eager, the engines; on a GPU torch-compile and torch-fp8; on a CPU that multiplies
    bf16 in hardware (AMX, AVX512-BF16: `bf16_cpu`, read from /proc/cpuinfo when None) torch-eager-bf16."""
    names: tuple[str, ...] = (BASELINE, "torch-eager", ENGINES)
    if device.type == "cuda":
        return (*names, "torch-compile", "torch-fp8")
    if cpu_has_bf16() if bf16_cpu is None else bf16_cpu:
        return (*names, "torch-eager-bf16")
    return names


def _engines_or_note(
    build_dir: Path, components: Components, device: torch.device, notes: list[str], name: str
) -> list[Contestant]:
    required = name != ENGINES
    try:
        return engine_contestants(build_dir, components, device)
    except KontextError as e:
        if required:
            raise ConfigError(
                f"contestant {name!r} is not diffusers, torch-<mode>[+lever...] nor engines, and no "
                f"engine artifact can name it: {e}"
            ) from e
        notes.append(f"no engine contestants: {e}")
        log.warning("no engine contestants: %s", e)
        return []


def bucket_image(source: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """The source cropped to the bucket's aspect ratio and resized to it: every contestant's input."""
    return ImageOps.fit(source, bucket, method=Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class _Case:
    """One bucket of the run: its input image, settings and shape key."""

    bucket: tuple[int, int]
    image: Image.Image
    settings: EditRequest  # its image and prompt: the case's (contestants replace the prompt per round)
    key: ShapeKey


def run_bench(
    config: BenchConfig,
    components: Components | None = None,
    contestants: list[Contestant] | None = None,
    on_progress: Progress | None = None,
) -> BenchRun:
    """Run the benchmark; measures only (writing results is report.write_results).

    components: already loaded ones (in the config's device and dtype), else loaded from config.model.
    contestants: explicit entrants (a name + a Denoiser factory each), else resolved from config.contestants.
    on_progress: called with the run so far after each contestant (sequential) and at the end.
    """
    from .. import assets

    started = datetime.now()
    device = torch.device(config.device)
    dtype = config.dtype
    source = load_image(config.image or assets.sample_image_path())
    if components is None:
        components = load_components(config.model, dtype=dtype, device=device)
    family = components.preset.bucket_family
    chosen = check_buckets(config.buckets, family) if config.buckets else default_buckets(family)
    build_dir = config.build_dir or Path("build") / Path(str(config.model)).name
    notes: list[str] = []
    if contestants is None:
        contestants = select_contestants(config.contestants, components, device, dtype, build_dir, notes)
    text_tokens = components.preset.max_sequence_length
    cases = []
    for b in chosen:
        image = bucket_image(source, b)
        request = EditRequest(image, config.prompt, config.steps, config.guidance, config.seed, size=b)
        cases.append(_Case(b, image, request, shape_key(b, b, text_tokens)))
    run = BenchRun(
        config, components, device, started, chosen, contestants, {}, [], PeakMemory(device).kind, notes
    )
    if config.schedule == "sequential":
        from .sequential import run_sequential

        run_sequential(run, cases, on_progress)
    else:
        from .interleaved import run_interleaved

        run_interleaved(run, cases)
    run.finished = True
    if on_progress is not None:
        on_progress(run)
    return run


def _reference(run: BenchRun, case: _Case) -> Reference:
    name = f"torch-eager-{dtype_name(run.config.dtype)}"
    return record_reference(
        run.components, run.device, run.config.dtype, case.image, run.config.prompt, case.settings, name
    )


def _open(run: BenchRun, contestant: Contestant, entries: list[Entry]) -> EditRunner | None:
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
        _free(run.device)
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


def _free(device: torch.device) -> None:
    """Drop a closed contestant's modules and compiled code, so the next one starts cold (inductor's
    on-disk cache still turns graphs an earlier contestant compiled into hits: see the report's note)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_isolation(run: BenchRun, after: str, before: dict[str, tuple[object, ...]]) -> None:
    """The baseline's (and reference's) transformer must be exactly as it was before `after` ran."""
    diff = changed(before, fingerprint(run.components.transformer))
    verdict = "ok" if not diff else f"changed {len(diff)} tensors of the baseline, first {diff[0]}"
    run.isolation[after] = verdict
    if diff:
        run.notes.append(f"ISOLATION BROKEN after {after}: {verdict}")
        log.error("isolation broken after %s: %s", after, verdict)


def _serves(runner: EditRunner, key: ShapeKey, entry: Entry) -> bool:
    keys = runner.replay_denoiser.shape_keys
    if keys is not None and key not in keys:
        entry.skipped = f"shape {key} not served by this artifact"
        return False
    return True


def _quality(
    entry: Entry, runner: EditRunner, reference: Reference, run: BenchRun, steps: int | None = None
) -> None:
    """The entry's quality against the reference; a replay that raises is noted, never fatal."""
    if not entry.samples or entry.skipped:
        return
    replay = None if runner.replay_is_reference else runner.replay_denoiser
    try:
        entry.quality = measure_quality(replay, entry.samples[-1].image, reference, steps)
    except Exception as e:
        run.notes.append(f"{entry.contestant.name}: quality replay failed: {failure(e)}")
        log.warning("%s: quality replay failed", entry.contestant.name, exc_info=True)


def _timed_run(
    runner: EditRunner, case: _Case, prompt: str, entry: Entry, meter: PeakMemory, keep: bool
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
        log.warning("%s failed on %dx%d: %s", runner.contestant.name, *entry.bucket, entry.skipped,
                    exc_info=not isinstance(e, KontextError))  # fmt: skip
        return None
    seconds = time.perf_counter() - t0
    if entry.first_edit_s is None:
        entry.first_edit_s = seconds
    if keep:
        entry.samples.append(sample)
        entry.peak_memory.extend(max(p - entry.memory_base, 0) for p in peaks)
    return seconds


def _profile_step(runner: EditRunner, reference: Reference, top: int = 25) -> str:
    """torch.profiler over one transformer step (the reference's middle step): the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    call = reference.calls[len(reference.calls) // 2]
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

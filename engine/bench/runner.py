"""`kontext bench`: every contestant on the same weights, inputs and seeds.

Two schedules.
- interleaved (default): per bucket, warm-up edits (discarded), then `repeats` rounds; each round runs
  every contestant once, in an order rotated by one per round, so drift and position effects (noise on
  our CPUs is +-20-30% per run) fall on everyone alike. Every contestant is loaded for the whole run.
- sequential (GPU runs of the 12B model): one contestant at a time is loaded, warmed up, timed over
  every bucket, checked for quality, then freed, so device memory holds the baseline and ONE contestant
  (bf16 transformer 24 GB + T5 9.5 GB + an FP8 copy ~12 GB on an H100). A deadline skips the contestants
  that no longer fit, in the order given (list the important ones first), and `on_progress` is called
  after each contestant so a killed run still leaves results.
Quality: one recorded reference edit per bucket (torch eager) and each contestant's replay of its steps.
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
from tqdm.auto import tqdm

from ..backends.torch import default_dtype, dtype_name
from ..buckets import ShapeKey, buckets, shape_key
from ..config import EditSettings
from ..errors import ConfigError, KontextError
from ..images import load_image
from ..model.components import Components
from ..model.load import load_components
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
from .quality import Quality, Reference, measure_quality, record_reference
from .timing import PeakMemory, summarize

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "add a small red hat"
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
    guidance: float = 2.5
    progress: bool = True
    schedule: str = "interleaved"  # or "sequential" (see the module doc)
    deadline_s: float | None = None  # sequential only: skip contestants that would end past it
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
        names = (BASELINE, "torch-eager", ENGINES)
        if device.type == "cuda":
            names += ("torch-compile", "torch-fp8")
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
    settings: EditSettings
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
    cases = [
        _Case(
            b,
            bucket_image(source, b),
            EditSettings(steps=config.steps, guidance=config.guidance, seed=config.seed, size=b),
            shape_key(b, b, text_tokens),
        )
        for b in chosen
    ]
    run = BenchRun(
        config, components, device, started, chosen, contestants, {}, [], PeakMemory(device).kind, notes
    )
    if config.schedule == "sequential":
        _run_sequential(run, cases, on_progress)
    else:
        _run_interleaved(run, cases)
    run.finished = True
    if on_progress is not None:
        on_progress(run)
    return run


def _reference(run: BenchRun, case: _Case) -> Reference:
    name = f"torch-eager-{dtype_name(run.config.dtype)}"
    return record_reference(
        run.components, run.device, run.config.dtype, case.image, run.config.prompt, case.settings, name
    )


def _run_interleaved(run: BenchRun, cases: list[_Case]) -> None:
    config = run.config
    baseline_print = fingerprint(run.components.transformer)
    runners = _open_all(run)
    meter = PeakMemory(run.device)
    total = len(cases) * (config.warmup + config.repeats) * len(runners)
    bar = tqdm(total=total, desc="bench", unit="edit", disable=not config.progress)
    for i, case in enumerate(cases):
        entries = {r.contestant.name: Entry(r.contestant, case.bucket, case.key) for r in runners}
        if i == 0:
            for name, entry in entries.items():
                entry.load_s = run.load_seconds.get(name)
        live = [r for r in runners if _serves(r, case.key, entries[r.contestant.name])]
        bar.total -= (config.warmup + config.repeats) * (len(runners) - len(live))
        for rnd in range(config.warmup + config.repeats):
            warm = rnd < config.warmup
            order = live[rnd % len(live) :] + live[: rnd % len(live)] if live else []
            for runner in order:
                entry = entries[runner.contestant.name]
                if not entry.skipped:
                    phase = "warm-up" if warm else f"round {rnd - config.warmup + 1}"
                    bar.set_postfix_str(f"{case.bucket[0]}x{case.bucket[1]} {phase} {runner.contestant.name}")
                    _timed_run(runner, case, run.config.prompt, entry, meter, keep=not warm)
                bar.update()
        bar.set_postfix_str(f"{case.bucket[0]}x{case.bucket[1]} quality vs the reference")
        reference = _reference(run, case)
        for runner in live:
            _quality(entries[runner.contestant.name], runner, reference)
        run.entries.extend(entries.values())
    bar.close()
    for runner in runners:
        runner.close()
    _check_isolation(run, "all contestants", baseline_print)


def _run_sequential(run: BenchRun, cases: list[_Case], on_progress: Progress | None) -> None:
    """One contestant at a time: open, warm up and time every bucket, replay, close, free."""
    config = run.config
    t_start = time.monotonic()
    references = {case.bucket: _reference(run, case) for case in cases}
    baseline_print = fingerprint(run.components.transformer)
    meter = PeakMemory(run.device)
    last_cost: float | None = None
    for contestant in tqdm(run.contestants, desc="bench", unit="contestant", disable=not config.progress):
        entries = [Entry(contestant, case.bucket, case.key) for case in cases]
        run.entries.extend(entries)
        left = None if config.deadline_s is None else config.deadline_s - (time.monotonic() - t_start)
        if left is not None and (left <= 0 or (last_cost is not None and last_cost > left)):
            need = f", the last contestant took {last_cost:.0f} s" if last_cost is not None else ""
            for e in entries:
                e.skipped = f"deadline: {max(left, 0):.0f} s left{need}"
            log.warning("%s skipped: %s", contestant.name, entries[0].skipped)
            if on_progress is not None:
                on_progress(run)
            continue
        t0 = time.monotonic()
        runner = _open(run, contestant, entries)
        if runner is not None:
            for case, entry in zip(cases, entries, strict=True):
                if not _serves(runner, case.key, entry):
                    continue
                for rnd in range(config.warmup + config.repeats):
                    _timed_run(runner, case, config.prompt, entry, meter, keep=rnd >= config.warmup)
                _quality(entry, runner, references[case.bucket])
                if contestant.name in config.profile:
                    entry.profile = _profile_step(runner, references[case.bucket])
            runner.close()
            del runner
            _free(run.device)
            _check_isolation(run, contestant.name, baseline_print)
            if run.device.type == "cuda":
                held = torch.cuda.memory_allocated(run.device) / 2**30
                log.info("%s freed: %.1f GiB still allocated", contestant.name, held)
        last_cost = time.monotonic() - t0
        if on_progress is not None:
            on_progress(run)


def _open(run: BenchRun, contestant: Contestant, entries: list[Entry]) -> EditRunner | None:
    """Open one contestant, timing it; on a KontextError its entries say why it was skipped."""
    t0 = time.perf_counter()
    try:
        runner = open_runner(contestant, run.components, run.device, run.config.dtype)
    except KontextError as e:
        run.notes.append(f"{contestant.name} not loaded: {e}")
        log.warning("%s not loaded: %s", contestant.name, e)
        for entry in entries:
            entry.skipped = f"not loaded: {e}"
        return None
    seconds = time.perf_counter() - t0
    run.load_seconds[contestant.name] = seconds
    if entries:
        entries[0].load_s = seconds
    return runner


def _open_all(run: BenchRun) -> list[EditRunner]:
    runners = []
    for c in tqdm(run.contestants, desc="load contestants", leave=False, disable=not run.config.progress):
        runner = _open(run, c, [])
        if runner is not None:
            runners.append(runner)
    return runners


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


def _quality(entry: Entry, runner: EditRunner, reference: Reference) -> None:
    if entry.samples and not entry.skipped:
        replay = None if runner.replay_is_reference else runner.replay_denoiser
        entry.quality = measure_quality(replay, entry.samples[-1].image, reference)


def _timed_run(
    runner: EditRunner, case: _Case, prompt: str, entry: Entry, meter: PeakMemory, keep: bool
) -> None:
    peaks: list[int] = []
    t0 = time.perf_counter()
    try:
        with meter.measure(peaks):
            sample = runner.run(case.image, prompt, case.settings)
    except KontextError as e:
        entry.skipped = f"failed: {e}"
        log.warning("%s failed on %dx%d: %s", runner.contestant.name, *entry.bucket, e)
        return
    if entry.first_edit_s is None:
        entry.first_edit_s = time.perf_counter() - t0
    if keep:
        entry.samples.append(sample)
        entry.peak_memory.extend(peaks)


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

"""`kontext bench`: every contestant on the same weights, inputs and seeds, interleaved round by round.

Per bucket: warm-up edits (discarded), then `repeats` rounds; each round runs every contestant once, in
an order rotated by one per round, so drift and position effects (noise here is +-20-30% per run) fall
on everyone alike. Then the quality pass: one recorded reference edit and each contestant's replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..backends.torch import device_capability, dtype_name, fp8_supported
from ..buckets import ShapeKey, buckets, shape_key
from ..config import EditSettings
from ..errors import ConfigError, KontextError
from ..images import load_image
from ..weights import Components, load_components
from .contestants import (
    BASELINE,
    ENGINES,
    TORCH_VARIANTS,
    Contestant,
    EditRunner,
    RunSample,
    engine_contestants,
    open_runner,
    torch_contestant,
)
from .quality import Quality, measure_quality, record_reference
from .timing import PeakMemory

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "add a small red hat"


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

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def dtype(self) -> torch.dtype:
        """fp32 on CPU (the reference precision), bf16 on a GPU."""
        return torch.float32 if self.device == "cpu" else torch.bfloat16


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
    """Resolve contestant names: 'diffusers', 'torch-eager', 'torch-compile', 'torch-fp8', 'engines' (all
    artifacts of the manifest) or one artifact's name such as 'onnxruntime-int8'."""
    if names is None:
        names = (BASELINE, "torch-eager", ENGINES)
        if device.type == "cuda":
            names += ("torch-compile",) + (("torch-fp8",) if fp8_supported(device_capability(device)) else ())
    out: list[Contestant] = []
    engines: list[Contestant] | None = None
    for name in names:
        if name == BASELINE:
            out.append(Contestant(BASELINE, "diffusers", dtype_name(dtype)))
        elif name in TORCH_VARIANTS:
            out.append(torch_contestant(name, components, device, dtype))
        else:
            if engines is None:
                engines = _engines_or_note(build_dir, components, device, notes, name)
            chosen = [c for c in engines if name in (ENGINES, c.name)]
            if not chosen and name != ENGINES:
                have = ", ".join(c.name for c in engines) or "none"
                raise ConfigError(
                    f"unknown contestant {name!r}: not diffusers, {', '.join(TORCH_VARIANTS)}, "
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
                f"contestant {name!r} is not diffusers, {', '.join(TORCH_VARIANTS)} nor engines, and no "
                f"engine artifact can name it: {e}"
            ) from e
        notes.append(f"no engine contestants: {e}")
        log.warning("no engine contestants: %s", e)
        return []


def bucket_image(source: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """The source cropped to the bucket's aspect ratio and resized to it: every contestant's input."""
    return ImageOps.fit(source, bucket, method=Image.Resampling.LANCZOS)


def run_bench(
    config: BenchConfig, components: Components | None = None, contestants: list[Contestant] | None = None
) -> BenchRun:
    """Run the benchmark; measures only (writing results is report.write_results).

    components: already loaded ones (in the config's device and dtype), else loaded from config.model.
    contestants: explicit entrants (a name + a Denoiser factory each), else resolved from config.contestants.
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
    runners, load_seconds = _open_runners(contestants, components, device, dtype, notes, config.progress)
    meter = PeakMemory(device)
    text_tokens = components.preset.max_sequence_length
    reference_name = f"torch-eager-{dtype_name(dtype)}"

    total = len(chosen) * (config.warmup + config.repeats) * len(runners)
    bar = tqdm(total=total, desc="bench", unit="edit", disable=not config.progress)
    entries: list[Entry] = []
    for bucket in chosen:
        image = bucket_image(source, bucket)
        settings = EditSettings(steps=config.steps, guidance=config.guidance, seed=config.seed, size=bucket)
        key = shape_key(bucket, bucket, text_tokens)
        bucket_entries = {r.contestant.name: Entry(r.contestant, bucket, key) for r in runners}
        live = [r for r in runners if _serves(r, key, bucket_entries[r.contestant.name])]
        bar.total -= (config.warmup + config.repeats) * (len(runners) - len(live))
        for rnd in range(config.warmup + config.repeats):
            warm = rnd < config.warmup
            order = live[rnd % len(live) :] + live[: rnd % len(live)] if live else []
            for runner in order:
                entry = bucket_entries[runner.contestant.name]
                if entry.skipped:
                    bar.update()
                    continue
                phase = "warm-up" if warm else f"round {rnd - config.warmup + 1}"
                bar.set_postfix_str(f"{bucket[0]}x{bucket[1]} {phase} {runner.contestant.name}")
                _timed_run(runner, image, config.prompt, settings, entry, meter, keep=not warm)
                bar.update()
        bar.set_postfix_str(f"{bucket[0]}x{bucket[1]} quality vs the reference")
        reference = record_reference(
            components, device, dtype, image, config.prompt, settings, reference_name
        )
        for runner in live:
            entry = bucket_entries[runner.contestant.name]
            if entry.samples and not entry.skipped:
                entry.quality = measure_quality(runner.replay_denoiser, entry.samples[-1].image, reference)
        entries.extend(bucket_entries.values())
    bar.close()
    return BenchRun(
        config, components, device, started, chosen, contestants, load_seconds, entries, meter.kind, notes
    )


def _open_runners(
    contestants: list[Contestant],
    components: Components,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str],
    progress: bool,
) -> tuple[list[EditRunner], dict[str, float]]:
    runners: list[EditRunner] = []
    seconds: dict[str, float] = {}
    for c in tqdm(contestants, desc="load contestants", leave=False, disable=not progress):
        t0 = time.perf_counter()
        try:
            runners.append(open_runner(c, components, device, dtype))
        except KontextError as e:
            notes.append(f"{c.name} not loaded: {e}")
            log.warning("%s not loaded: %s", c.name, e)
            continue
        seconds[c.name] = time.perf_counter() - t0
    return runners, seconds


def _serves(runner: EditRunner, key: ShapeKey, entry: Entry) -> bool:
    keys = runner.replay_denoiser.shape_keys
    if keys is not None and key not in keys:
        entry.skipped = f"shape {key} not served by this artifact"
        return False
    return True


def _timed_run(
    runner: EditRunner,
    image: Image.Image,
    prompt: str,
    settings: EditSettings,
    entry: Entry,
    meter: PeakMemory,
    keep: bool,
) -> None:
    peaks: list[int] = []
    try:
        with meter.measure(peaks):
            sample = runner.run(image, prompt, settings)
    except KontextError as e:
        entry.skipped = f"failed: {e}"
        log.warning("%s failed on %dx%d: %s", runner.contestant.name, *entry.bucket, e)
        return
    if keep:
        entry.samples.append(sample)
        entry.peak_memory.extend(peaks)

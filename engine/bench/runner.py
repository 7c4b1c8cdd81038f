"""`kontext bench`: every contestant on the same weights, inputs and seeds. run_bench picks the buckets
and contestants and hands the run to a schedule: interleaved (the default, interleaved.py: every contestant
loaded, rounds rotated) or sequential (GPU runs of the 12B model, sequential.py: one contestant at a time,
a deadline counted from the start of the process). In both, any exception of one contestant is its
result, never the run's end. Quality: one recorded reference edit per bucket (torch eager) and each
contestant's replay of its steps. What the schedules share is in run.py.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..backends.torch import dtype_name
from ..buckets import buckets, shape_key
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
    engine_contestants,
    split_step_cache,
    torch_contestant,
    with_step_cache,
)
from .interleaved import run_interleaved
from .machine import cpu_has_bf16
from .run import BenchConfig, BenchRun, Case, Progress
from .sequential import run_sequential
from .timing import PeakMemory

log = logging.getLogger(__name__)


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
    """Resolve contestant names: 'diffusers', torch-{eager|compile|fp8}[+lever...]
    (backends.torch_options.LEVERS), 'engines' (all artifacts of the manifest) or one artifact's name
    such as 'onnxruntime-int8'."""
    if names is None:
        names = default_contestants(device)
    out: list[Contestant] = []
    engines: list[Contestant] | None = None
    for full_name in names:
        name, step_cache = split_step_cache(full_name)
        if name == BASELINE:
            if step_cache is not None:
                raise ConfigError("diffusers runs its own loop: a +cache= contestant is one of ours")
            out.append(Contestant(BASELINE, "diffusers", dtype_name(dtype)))
        elif name.startswith(TORCH_PREFIX):
            out.append(with_step_cache(torch_contestant(name, components, device, dtype), step_cache))
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
            out.extend(with_step_cache(c, step_cache) for c in chosen)
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
        cases.append(Case(b, image, request, shape_key(b, b, text_tokens)))
    run = BenchRun(
        config, components, device, started, chosen, contestants, {}, [], PeakMemory(device).kind, notes
    )
    if config.schedule == "sequential":
        run_sequential(run, cases, on_progress)
    else:
        run_interleaved(run, cases)
    run.finished = True
    if on_progress is not None:
        on_progress(run)
    return run

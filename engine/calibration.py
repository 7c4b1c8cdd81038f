"""The calibration set and the one loop that runs it: bundled images paired with bundled instructions
(round-robin over the five edit categories), seeded, denoised by OUR sampling loop.

Two users: the build records the transformer's inputs of these edits (build/calibrate.py writes them
for the ONNX/TensorRT quantizers), and static FP8 on the torch path takes each Linear's input amax over
the same edits (`calibrate_amax`). Both see exactly the same calls, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .assets import calibration_image_paths, calibration_prompts
from .backends import Denoiser
from .backends.fp8 import collect_amax
from .backends.torch import TorchDenoiser
from .buckets import ShapeKey
from .config import DEFAULT_GUIDANCE
from .errors import BuildError
from .images import load_image
from .model.components import Components
from .pipeline import KontextPipeline
from .request import EditRequest


@dataclass(frozen=True)
class CalibrationSpec:
    """Which edits calibration runs and which steps it records. Part of the calibration hash."""

    edits: int = 32  # (image, instruction) pairs; the instructions cover all five categories
    steps: int = 4  # sampling steps per edit (the schedule of a `steps`-step edit)
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.edits < 1 or self.steps < 1:
            raise BuildError(f"calibration needs edits and steps >= 1, got {self}")

    @property
    def samples(self) -> int:
        return self.edits * self.steps


@dataclass(frozen=True)
class CalibrationEdit:
    image: Path
    category: str
    prompt: str
    seed: int


def calibration_edits(spec: CalibrationSpec) -> list[CalibrationEdit]:
    """spec.edits pairs: instructions interleaved across categories, images cycled, seeds spec.seed + i."""
    images = calibration_image_paths()
    by_category: dict[str, list[str]] = {}
    for category, prompt in calibration_prompts():
        by_category.setdefault(category, []).append(prompt)
    if not images or not by_category:
        raise BuildError("the calibration set is empty (engine/assets/calibration); reinstall kontext-engine")
    order: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in by_category.values())):
        order += [(c, v[i]) for c, v in by_category.items() if i < len(v)]
    return [
        CalibrationEdit(images[i % len(images)], *order[i % len(order)], spec.seed + i)
        for i in range(spec.edits)
    ]


def run_edit(pipe: KontextPipeline, request: EditRequest, denoiser: Denoiser) -> ShapeKey:
    """Denoise one edit through `pipe` with `denoiser` (no decode); its shape key."""
    p = pipe.prepare(request)
    with torch.inference_mode():
        p.denoise(denoiser)
    return p.shape_key


def run_calibration(
    components: Components,
    denoiser: Denoiser,
    spec: CalibrationSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    after_edit: Callable[[CalibrationEdit], None] | None = None,
    progress: bool = True,
) -> None:
    """Denoise every calibration edit of `spec` with `denoiser` (an observer: a recording or hooked
    denoiser), calling `after_edit(edit)` after each. family: where images are bucketed (default: the
    preset's). progress: a tqdm bar per edit (off for --no-progress)."""
    pipe = KontextPipeline(components, device=str(device), dtype=dtype, bucket_family=family)
    edits = calibration_edits(spec)
    for e in tqdm(edits, desc="calibrate", unit="edit", leave=False, disable=not progress):
        request = EditRequest(load_image(e.image), e.prompt, spec.steps, spec.guidance, e.seed)
        run_edit(pipe, request, denoiser)
        if after_edit is not None:
            after_edit(e)


def calibrate_amax(
    components: Components,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    edits: int = 4,
    steps: int = 2,
    transformer: torch.nn.Module | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Per-Linear input amax (static FP8 scales) over the calibration edits, run in `dtype` on `device`.

    The transformer (default: the components') is run eagerly with hooks on every FP8-eligible Linear;
    nothing is changed.
    """
    module = transformer if transformer is not None else components.transformer
    amax, handles = collect_amax(module)
    try:
        run_calibration(
            components,
            TorchDenoiser(module),
            CalibrationSpec(edits=edits, steps=steps),
            device=device,
            dtype=dtype,
            progress=progress,
        )
    finally:
        for h in handles:
            h.remove()
    return {k: float(v) for k, v in amax.items()}

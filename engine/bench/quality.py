"""Quality of a contestant against the golden edit (the torch eager edit in the benchmark's dtype: fp32
on CPU, bf16 on GPU): PSNR of the final image, and relative L2 of the transformer output at every step.

Per-step metric, on purpose: trajectories diverge (a small error at step 1 moves every later input), so
comparing each contestant's outputs along its OWN trajectory would mix the transformer's error with the
loop's drift. Instead the golden edit's denoiser inputs are recorded, every contestant's denoiser is fed
exactly those inputs, and its outputs are compared with the golden outputs, step by step. The GPU
run replays a few evenly spaced steps (first and last included) rather than all 28: the same gate for a
quarter of the forwards. The per-step error is what goals gate on; PSNR of a random-weight model's final
image after many steps mostly measures how the loop amplifies noise, so it is printed, not gated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from PIL import Image

from ..backends import Denoiser
from ..backends.recording import DenoiserCall, RecordingDenoiser
from ..backends.torch import TorchDenoiser
from ..metrics import psnr, rel_l2
from ..model.components import Components
from ..pipeline import KontextPipeline
from ..request import EditRequest


@dataclass(frozen=True)
class Golden:
    """The golden edit (named in the report's "reference" field): its name, final image, and every
    denoiser call (inputs and output)."""

    name: str
    image: Image.Image
    calls: tuple[DenoiserCall, ...]


@dataclass(frozen=True)
class Quality:
    reference: str  # the golden edit's name (a field of the JSONL rows: kept)
    psnr_db: float  # inf: identical to the reference image
    step_rel_l2: tuple[float, ...]  # per replayed step, on the reference trajectory's inputs
    steps: tuple[int, ...] = ()  # which steps (0-based) step_rel_l2 covers

    @property
    def rel_l2_max(self) -> float:
        return max(self.step_rel_l2, default=math.nan)

    @property
    def rel_l2_mean(self) -> float:
        return sum(self.step_rel_l2) / len(self.step_rel_l2) if self.step_rel_l2 else math.nan


def record_golden(
    components: Components,
    device: torch.device,
    dtype: torch.dtype,
    image: Image.Image,
    prompt: str,
    settings: EditRequest,
    name: str,
) -> Golden:
    """Run the torch eager edit once, recording the transformer's inputs and outputs at every step."""
    recorder = RecordingDenoiser(TorchDenoiser(components.transformer, name=name))
    pipe = KontextPipeline(components, recorder, device=str(device), dtype=dtype)
    result = pipe.edit(replace(settings, image=image, prompt=prompt), progress=False)
    return Golden(name=name, image=result.image, calls=tuple(recorder.calls))


def spread_steps(total: int, most: int | None) -> tuple[int, ...]:
    """`most` step indices evenly spread over range(total), first and last included (all when None)."""
    if most is None or most >= total:
        return tuple(range(total))
    if most <= 1:
        return (total - 1,) if most == 1 else ()
    return tuple(sorted({round(i * (total - 1) / (most - 1)) for i in range(most)}))


def replay_rel_l2(
    denoiser: Denoiser, golden: Golden, steps: tuple[int, ...] | None = None
) -> tuple[float, ...]:
    """Relative L2 of `denoiser`'s output vs the reference's at each of `steps` (default: every step),
    fed the reference's inputs."""
    out = []
    chosen = range(len(golden.calls)) if steps is None else steps
    with torch.inference_mode():
        for i in chosen:
            call = golden.calls[i]
            y = denoiser(**call.inputs)
            out.append(rel_l2(y.float(), call.output.float()))
    return tuple(out)


def measure_quality(
    denoiser: Denoiser | None, image: Image.Image, golden: Golden, most_steps: int | None = None
) -> Quality:
    """PSNR of the final image, and the per-step replay error at `most_steps` spread steps (all when None)
    unless `denoiser` is None (the caller knows it is the reference's own module: its error is 0)."""
    steps = spread_steps(len(golden.calls), most_steps) if denoiser is not None else ()
    return Quality(
        reference=golden.name,
        psnr_db=psnr(image, golden.image),
        step_rel_l2=() if denoiser is None else replay_rel_l2(denoiser, golden, steps),
        steps=steps,
    )

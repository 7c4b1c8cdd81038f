"""Quality of a contestant against the reference (the torch eager edit in the benchmark's dtype: fp32 on CPU,
bf16 on GPU): PSNR of the final image, and relative L2 of the transformer output at every step.

Per-step metric, on purpose: trajectories diverge (a small error at step 1 moves every later input), so
comparing each contestant's outputs along its OWN trajectory would mix the transformer's error with the
loop's drift. Instead the reference's denoiser inputs are recorded, every contestant's denoiser is fed
exactly those inputs, and its outputs are compared with the reference's outputs, step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from ..backends import Denoiser
from ..backends.recording import DenoiserCall, RecordingDenoiser
from ..backends.torch import TorchDenoiser
from ..config import EditSettings
from ..metrics import psnr, rel_l2
from ..model.components import Components
from ..pipeline import KontextPipeline


@dataclass(frozen=True)
class Reference:
    """The reference edit: its name, final image, and every denoiser call (inputs and output)."""

    name: str
    image: Image.Image
    calls: tuple[DenoiserCall, ...]


@dataclass(frozen=True)
class Quality:
    reference: str
    psnr_db: float  # inf: identical to the reference image
    step_rel_l2: tuple[float, ...]  # per step, on the reference trajectory's inputs

    @property
    def rel_l2_max(self) -> float:
        return max(self.step_rel_l2, default=math.nan)

    @property
    def rel_l2_mean(self) -> float:
        return sum(self.step_rel_l2) / len(self.step_rel_l2) if self.step_rel_l2 else math.nan


def record_reference(
    components: Components,
    device: torch.device,
    dtype: torch.dtype,
    image: Image.Image,
    prompt: str,
    settings: EditSettings,
    name: str,
) -> Reference:
    """Run the torch eager edit once, recording the transformer's inputs and outputs at every step."""
    recorder = RecordingDenoiser(TorchDenoiser(components.transformer, name=name))
    pipe = KontextPipeline(components, recorder, device=str(device), dtype=dtype)
    result = pipe.edit(image, prompt, settings, progress=False)
    return Reference(name=name, image=result.image, calls=tuple(recorder.calls))


def replay_rel_l2(denoiser: Denoiser, reference: Reference) -> tuple[float, ...]:
    """Relative L2 of `denoiser`'s output vs the reference's, at each step, fed the reference's inputs."""
    out = []
    with torch.inference_mode():
        for call in reference.calls:
            y = denoiser(**call.inputs)
            out.append(rel_l2(y.float(), call.output.float()))
    return tuple(out)


def measure_quality(denoiser: Denoiser | None, image: Image.Image, reference: Reference) -> Quality:
    """PSNR of the final image, and the per-step replay error unless `denoiser` is None (the caller knows
    it is the reference's own module, whose replay error is 0 by construction)."""
    return Quality(
        reference=reference.name,
        psnr_db=psnr(image, reference.image),
        step_rel_l2=() if denoiser is None else replay_rel_l2(denoiser, reference),
    )

"""The plan `engine.load(..., vram=...)` makes: the card's size ("auto": the device's total memory), the
precision the backend would run in, whether the GPU has FP8 GEMMs. One function, so load, serve and the
benchmark plan alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..backends.fp8 import device_capability, fp8_supported
from ..config import parse_vram as parse_vram  # the one rule, beside LoadOptions
from ..errors import ConfigError
from .plan import GIB, MemoryPlan, plan_memory

if TYPE_CHECKING:
    from ..backends.torch_options import TorchOptions
    from ..config import LoadOptions
    from ..manifest import Manifest

log = logging.getLogger(__name__)


def card_gib(vram: float | str, device: torch.device) -> float | None:
    """GiB of the card to plan for: the number given, or with "auto" the device's total memory (None on
    a device without one: nothing to plan)."""
    if vram != "auto":
        return float(vram)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


def plan_for_load(
    model: str | Path,
    vram: float | str,
    *,
    device: str | torch.device,
    torch_mode: str = "eager",
    precision: str | None = None,
) -> MemoryPlan | None:
    """The plan of a load: torch_mode fp8 (torchao, the 'tokens' filter) or a build's fp8 artifact plan
    the transformer in FP8 from the start; else bf16. Refuses, in one line, a card nothing fits."""
    dev = torch.device(device)
    gib = card_gib(parse_vram(vram) or "auto", dev)
    if gib is None:
        log.info("vram=auto on %s: no card to plan for", dev)
        return None
    fp8 = torch_mode == "fp8" or precision == "fp8"
    plan = plan_memory(
        model,
        vram=gib,
        precision="fp8" if fp8 else "bf16",
        fp8_compute=fp8_supported(device_capability(dev)),
        fp8_filter="tokens" if torch_mode == "fp8" else "all",
    )
    if not plan.fits:
        raise ConfigError(plan.refusal())
    log.info("%s", plan.describe())
    return plan


def plan_load(
    model: str | Path,
    options: LoadOptions,
    torch_options: TorchOptions | None = None,
    *,
    manifest: Manifest | None = None,
    given: MemoryPlan | None = None,
) -> MemoryPlan | None:
    """engine.load's plan (options resolved: backend and device set): `given`, or the plan of
    options.vram (None without one), checked against the levers it must compose with."""
    if given is None and options.vram is None:
        return None
    if options.backend == "onnxruntime":
        raise ConfigError("vram plans the torch and TensorRT paths; ONNX Runtime runs without a plan")
    precision = options.precision or (manifest.artifacts[0].precision if manifest is not None else None)
    plan = given
    if plan is None and options.vram is not None:
        device = options.device or "cpu"
        plan = plan_for_load(
            model, options.vram, device=device, torch_mode=options.torch_mode, precision=precision
        )
    if plan is not None and options.backend == "torch":
        from .apply import check_composes

        check_composes(
            plan,
            torch_mode=options.torch_mode,
            cuda_graphs=torch_options is not None and torch_options.cuda_graphs,
            context_parallel=options.context_parallel,
            workers=options.workers,
        )
    return plan

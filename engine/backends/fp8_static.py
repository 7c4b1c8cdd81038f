"""Static FP8 activation scales: per-Linear input amax from the build's calibration edits, and a Linear
that quantizes its input with that fixed scale (no per-call amax reduction) before one scaled matmul.

The recipe is ModelOpt's FP8 recipe for Flux (what the TensorRT build ships): per-tensor E4M3 weights
and activations, "max" calibration. torchao's dynamic recipe instead computes each token's amax at
every call; the GPU benchmark measures both (contestants torch-fp8 and torch-fp8+static).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from .torch import TorchDenoiser, fp8_filter, require_fp8

log = logging.getLogger(__name__)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def _scale(amax: float | torch.Tensor) -> torch.Tensor:
    """amax -> the per-tensor scale that maps it to E4M3's largest value (float32 scalar)."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    return (a.clamp_min(1e-12) / E4M3_MAX).reshape(())


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448, as float8_e4m3fn."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class StaticFp8Linear(torch.nn.Module):
    """y = x W^T + b with x and W in E4M3, each with one fixed scale; one torch._scaled_mm per call."""

    weight_scale: torch.Tensor  # [] float32
    weight_fp8: torch.Tensor  # [N, K] float8_e4m3fn
    input_scale: torch.Tensor  # [] float32

    def __init__(self, linear: torch.nn.Linear, input_amax: float) -> None:
        super().__init__()
        w = linear.weight.detach()  # [N, K]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_scale = _scale(w.abs().amax().float()).to(w.device)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_fp8", to_e4m3(w, w_scale))  # [N, K] row-major: W^T is column-major
        self.register_buffer("input_scale", _scale(input_amax).to(w.device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        lead = x.shape[:-1]
        xq = to_e4m3(x.reshape(-1, self.in_features), self.input_scale)  # [M, K]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(
            xq,
            self.weight_fp8.t(),
            scale_a=self.input_scale,
            scale_b=self.weight_scale,
            bias=bias,
            out_dtype=x.dtype,
        )  # [M, N]
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 static per-tensor"


def quantize_static(
    transformer: torch.nn.Module,
    amax: Mapping[str, float],
    device: torch.device,
    which: str = "tokens",
    *,
    allow_cpu: bool = False,
) -> torch.nn.Module:
    """Replace the Linears fp8_filter(which) selects by StaticFp8Linear, in place.

    allow_cpu: run on a CPU too (torch._scaled_mm has a CPU kernel: the tests check the numerics there).
    """
    if not allow_cpu:
        require_fp8(device)
    names = [n for n, m in transformer.named_modules() if fp8_filter(m, n, which)]
    amax = {n: a for n in names if (a := _amax_of(n, amax)) is not None}
    missing = [n for n in names if n not in amax]
    if missing:
        raise ConfigError(
            f"no calibrated amax for {len(missing)} Linears (first: {missing[0]}); calibrate this model "
            "with engine.backends.fp8_static.calibrate_amax"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, StaticFp8Linear(getattr(parent, child), amax[name]))
    log.info("static FP8: %d Linears quantized (%s filter)", len(names), which)
    return transformer


# A fused projection reads the same input as the Linears it replaced, so it takes their amax.
_FUSED_FROM = {"to_qkv": "to_q", "to_added_qkv": "add_q_proj"}


def _amax_of(name: str, amax: Mapping[str, float]) -> float | None:
    if name in amax:
        return amax[name]
    parent, _, leaf = name.rpartition(".")
    source = _FUSED_FROM.get(leaf)
    return amax.get(f"{parent}.{source}") if source else None


def collect_amax(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Forward pre-hooks that keep the running max |input| of every FP8-eligible Linear (the 'all'
    filter: a superset of 'tokens'). Returns the live amax dict and the hook handles to remove."""
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in transformer.named_modules():
        if not fp8_filter(module, name, "all"):
            continue

        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            a = args[0].detach().abs().amax().float()  # stays on the device: no sync per call
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        handles.append(module.register_forward_pre_hook(hook))
    return amax, handles


def calibrate_amax(
    components: Any,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    edits: int = 4,
    steps: int = 2,
    transformer: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Per-Linear input amax over the build's calibration edits (engine/build/calibrate.py's set: the
    bundled images and instructions, seeded), run through our sampling loop in `dtype` on `device`.

    The transformer (default: the components') is run eagerly with hooks; nothing is changed.
    """
    from ..build.calibrate import CalibrationSpec, calibration_edits
    from ..images import load_image
    from ..pipeline import KontextPipeline
    from ..request import EditRequest

    module = transformer if transformer is not None else components.transformer
    spec = CalibrationSpec(edits=edits, steps=steps)
    pipe = KontextPipeline(components, TorchDenoiser(module), device=str(device), dtype=dtype)
    amax, handles = collect_amax(module)
    try:
        for e in calibration_edits(spec):
            p = pipe.prepare(EditRequest(load_image(e.image), e.prompt, spec.steps, spec.guidance, e.seed))
            with torch.inference_mode():
                p.denoise(pipe.denoiser)
    finally:
        for h in handles:
            h.remove()
    return {k: float(v) for k, v in amax.items()}

"""FP8 on the torch path: which Linears, whether the GPU can, and the two ways to quantize them.

Which: `fp8_filter`. Every filter keeps the top-level embedders and output head in bf16 (`FP8_KEEP`,
matched on the first component of a module's name only: `single_transformer_blocks.3.proj_out` is a
block Linear and IS quantized; only the model's own `proj_out` is kept). The `tokens` filter (the
default) also keeps the modulation Linears. On the full Kontext config: tokens 418 Linears, all 494.

How: `quantize_fp8` (torchao, dynamic per-row activation scales computed at every call) or
`quantize_static` (`StaticFp8Linear`: per-tensor E4M3 weights and activations, the activation scale
fixed from calibration, ModelOpt's Flux recipe that the TensorRT build ships). The calibration that
gives the static scales is engine.calibration.calibrate_amax, over `collect_amax`'s hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
# Top-level modules kept in high precision under every FP8 filter: the embedders and the output head
# (NVIDIA's TensorRT demo and our ONNX recipe, engine/builder/quantize.py `^/proj_out/`, keep the same set).
FP8_KEEP = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
# The two FP8 filters the GPU benchmark measures side by side (docs/DESIGN-NOTES.md, "FP8 recipe"):
#   tokens: also keep the modulation Linears (`norm1.linear`, `norm1_context.linear`, `norm.linear`) in
#           bf16. They act on one row per image ([B, 3072] -> 6 x 3072): FP8 saves nothing on a GEMV
#           but quantizes the shift/scale/gate of every block. 3.2B of the 12B weights.
#   all:    every Linear of the blocks.
FP8_FILTERS: tuple[str, ...] = ("tokens", "all")
FP8_SCALES: tuple[str, ...] = ("dynamic", "static")  # torchao per-row per call | calibrated per tensor
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


# --------------------------------------------------------------------------- which Linears


def is_modulation(fqn: str) -> bool:
    """The AdaLN modulation Linears of the blocks: `norm1.linear`, `norm1_context.linear`, `norm.linear`."""
    parts = fqn.split(".")
    return len(parts) >= 2 and parts[-1] == "linear" and parts[-2].startswith("norm")


def fp8_filter(module: torch.nn.Module, fqn: str, which: str = "tokens") -> bool:
    """Which Linears FP8 quantizes (see FP8_FILTERS): never a top-level FP8_KEEP module, only sides
    divisible by 16 (what the FP8 GEMMs need)."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if fqn.split(".", 1)[0] in FP8_KEEP:
        return False
    if which == "tokens" and is_modulation(fqn):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_linears(transformer: torch.nn.Module, which: str = "tokens") -> list[str]:
    """Names of the Linears `fp8_filter(which)` selects, in module order (the bench's FLOP mix)."""
    return [n for n, m in transformer.named_modules() if fp8_filter(m, n, which)]


# --------------------------------------------------------------------------- can this GPU


def fp8_supported(capability: tuple[int, int] | None) -> bool:
    """FP8 tensor-core GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return capability is not None and tuple(capability) >= FP8_MIN_CAPABILITY


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def require_fp8(device: torch.device) -> None:
    cap = device_capability(device)
    if not fp8_supported(cap):
        raise BackendUnavailableError(
            f"FP8 needs a CUDA GPU of compute capability >= 8.9; {device} has "
            f"{cap or 'none'}. Use mode='eager' or 'compile' (bf16) on this machine"
        )


# --------------------------------------------------------------------------- torchao, dynamic scales


def quantize_fp8(
    transformer: torch.nn.Module, device: torch.device, which: str = "tokens"
) -> torch.nn.Module:
    """torchao float8 dynamic activations + float8 weights, per row, on the Linears fp8_filter selects;
    in place.

    set_inductor_config=False keeps inductor's defaults: torchao's own settings (coordinate-descent
    tuning) multiplied compile time, and the FP8 recipe of docs/hardware.md was measured without them.
    """
    require_fp8(device)
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise BackendUnavailableError("torchao is not installed; `pip install 'kontext-engine[fp8]'`") from e
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=lambda m, fqn: fp8_filter(m, fqn, which))
    return transformer


# --------------------------------------------------------------------------- static scales


def _scale(amax: float | torch.Tensor) -> torch.Tensor:
    """amax -> the per-tensor scale that maps it to E4M3's largest value (float32 scalar)."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    return (a.clamp_min(1e-12) / E4M3_MAX).reshape(())


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448, as float8_e4m3fn."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class StaticFp8Linear(torch.nn.Module):
    """y = x W^T + b with x and W in E4M3, each with one fixed scale; one torch._scaled_mm per call.

    use_fast_accum=True, as torchao's Float8 Linears: Hopper's FP8 tensor cores then accumulate without
    the periodic fp32 promotion. Left False, this contestant ran a slower GEMM than torchao's and the
    benchmark compared kernels, not scale recipes. torchao's default: its
    Float8DynamicActivationFloat8WeightConfig sets Float8MMConfig(use_fast_accum=True)
    (pytorch/ao, torchao/quantization/quant_api.py).
    """

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
            use_fast_accum=True,
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
            "with engine.calibration.calibrate_amax"
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

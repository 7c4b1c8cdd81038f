"""The levers of the torch path as one frozen `TorchOptions`, and their names: the lever tokens of a
contestant name (`torch-fp8+qkv+graphs`) and of `kontext edit --levers`, parsed and checked here.

torch.py applies them (`torch_denoiser`); nothing here touches a module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import TORCH_MODES as TORCH_MODES  # config owns the names
from ..errors import ConfigError
from .fp8 import FP8_FILTERS, FP8_SCALES

# attention: "sdpa" (torch), or "kernel-<variant>" for engine.kernels' Triton attention, whose variants
# (bf16, fp8-head, fp8-block, int8-fp8 ...) that package names and checks.
KERNEL_PREFIX = "kernel-"


@dataclass(frozen=True)
class TorchOptions:
    """The levers of the torch path. The defaults are the recipe `engine.load(torch_mode=...)` ships."""

    fp8_filter: str = "tokens"  # fp8 mode: which Linears (fp8.FP8_FILTERS)
    fp8_scales: str = "dynamic"  # fp8 mode: torchao dynamic per-row, or static per-tensor from calibration
    fused_qkv: bool = False  # one q|k|v Linear per attention (diffusers' fuse_projections)
    attention: str = "sdpa"  # torch SDPA, or "kernel-<variant>": engine.kernels' Triton attention
    cuda_graphs: bool = False  # capture the whole transformer step per input shape (CUDA only)
    dynamic: bool = False  # compile once with dynamic sequence lengths instead of once per shape
    compile_mode: str = "default"  # torch.compile mode; autotuning modes cost minutes per shape at 12B
    compile_cache: Path | None = (
        None  # a folder for torch's compile cache (mega-cache), e.g. build/x/compile-cache
    )
    compile_vae: bool = False  # the VAE's encoder and decoder compiled too (applied to the Components)
    freeze: bool = False  # inductor freezing: weights as constants, prepacked for oneDNN on CPUs

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("fp8_filter", self.fp8_filter, FP8_FILTERS),
            ("fp8_scales", self.fp8_scales, FP8_SCALES),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.attention != "sdpa" and not self.attention.startswith(KERNEL_PREFIX):
            raise ConfigError(
                f"attention must be 'sdpa' or '{KERNEL_PREFIX}<variant>', got {self.attention!r}"
            )

    @property
    def levers(self) -> tuple[str, ...]:
        """The non-default options as lever tokens, in LEVERS order (what a contestant name carries)."""
        tokens = [tok for tok, change in LEVERS.items() if _applied(self, change)]
        if self.attention != "sdpa":
            tokens.insert(2, ATTN_LEVER + self.attention.removeprefix(KERNEL_PREFIX))
        return tuple(tokens)


# name token -> the options it sets: `torch-fp8+qkv+graphs` is TorchOptions(fused_qkv=True, cuda_graphs=True).
# Plus `attn-<variant>`: attention="kernel-<variant>" (our Triton attention, e.g. attn-fp8-block).
LEVERS: dict[str, dict[str, Any]] = {
    "all": {"fp8_filter": "all"},
    "static": {"fp8_scales": "static"},
    "qkv": {"fused_qkv": True},
    "graphs": {"cuda_graphs": True},
    "dynamic": {"dynamic": True},
    "vae": {"compile_vae": True},
    "freeze": {"freeze": True},
}
ATTN_LEVER = "attn-"


def _applied(options: TorchOptions, change: Mapping[str, Any]) -> bool:
    return all(getattr(options, k) == v for k, v in change.items())


def parse_levers(tokens: str | list[str] | tuple[str, ...], base: TorchOptions | None = None) -> TorchOptions:
    """'qkv,graphs' or ['qkv', 'graphs'] -> TorchOptions with those levers set (on top of `base`)."""
    items = tokens.replace("+", ",").split(",") if isinstance(tokens, str) else list(tokens)
    changes: dict[str, Any] = {}
    for tok in (t.strip() for t in items):
        if not tok:
            continue
        if tok.startswith(ATTN_LEVER) and len(tok) > len(ATTN_LEVER):
            changes["attention"] = KERNEL_PREFIX + tok.removeprefix(ATTN_LEVER)
        elif tok in LEVERS:
            changes.update(LEVERS[tok])
        else:
            raise ConfigError(f"unknown torch lever {tok!r}; choose from {', '.join(LEVERS)}, attn-<variant>")
    return replace(base or TorchOptions(), **changes)


def parse_spec(spec: str) -> tuple[str, TorchOptions]:
    """A contestant name 'torch-fp8+qkv+graphs' -> ('fp8', TorchOptions(fused_qkv=True, cuda_graphs=True))."""
    head, *tokens = spec.split("+")
    mode = head.removeprefix("torch-")
    if not head.startswith("torch-") or mode not in TORCH_MODES:
        raise ConfigError(f"{spec!r} is not torch-{{{'|'.join(TORCH_MODES)}}}[+lever...]")
    options = parse_levers(tokens)
    check_options(mode, options)
    return mode, options


def check_options(mode: str, options: TorchOptions) -> None:
    """Refuse combinations that would silently do nothing."""
    if mode not in TORCH_MODES:
        raise ConfigError(f"torch mode must be one of {', '.join(TORCH_MODES)}, got {mode!r}")
    defaults = TorchOptions()
    if mode != "fp8":
        for name in ("fp8_filter", "fp8_scales"):
            if getattr(options, name) != getattr(defaults, name):
                raise ConfigError(f"{name} applies to torch mode fp8 only (mode is {mode})")
    if mode == "eager" and (
        options.dynamic or options.freeze or options.compile_mode != defaults.compile_mode
    ):
        raise ConfigError("dynamic, freeze and compile_mode apply to the compile and fp8 modes, not eager")

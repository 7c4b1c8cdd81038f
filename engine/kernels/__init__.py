"""Our Triton attention kernel for Hopper and its swap into the Flux transformer.

`attention(q, k, v, variant)` over [B, H, S, D] tensors (variants in VARIANTS: bf16, FP8 per head or per
block, INT8 QK with FP8 PV); `reference_attention` is its torch reference; `use_kernel_attention(transformer,
variant)` installs it in a diffusers Flux transformer and `restore_attention` undoes that. Importing this
package imports torch and triton, never diffusers (the processor is loaded on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .attention import LaunchConfig, attention
from .reference import exact_attention, reference_attention
from .variants import VARIANTS, AttentionVariant

__all__ = [
    "VARIANTS",
    "AttentionVariant",
    "KernelAttnProcessor",
    "LaunchConfig",
    "attention",
    "exact_attention",
    "reference_attention",
    "restore_attention",
    "use_kernel_attention",
]

if TYPE_CHECKING:
    from .processor import KernelAttnProcessor, restore_attention, use_kernel_attention

_LAZY = {"KernelAttnProcessor", "use_kernel_attention", "restore_attention"}


def __getattr__(name: str) -> Any:
    """The diffusers processor is imported on first use: diffusers is heavy, and the GPU benchmark runs
    without it."""
    if name in _LAZY:
        from . import processor

        return getattr(processor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

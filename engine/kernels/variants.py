"""The kernel's variants: which precision Q, K and V are held in inside the attention kernel, and how they
are scaled. Plain data, shared by the kernel launcher, the quantization pre-pass and the torch reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

Precision = Literal["bf16", "fp8", "int8-fp8"]
Granularity = Literal["head", "block"]

FP8_MAX = 448.0  # largest finite float8 e4m3fn (torch.float8_e4m3fn, Triton's tl.float8e4nv)
INT8_MAX = 127.0  # symmetric int8: -127..127, so that negation is exact


@dataclass(frozen=True)
class AttentionVariant:
    """How the kernel holds Q, K and V. Softmax, its running max and sum, and both accumulators are fp32
    in every variant.

    - precision "bf16": Q, K, V in their input dtype (bf16 or fp16), no scales: the baseline kernel.
    - "fp8": Q, K, V in float8 e4m3; QK^T and PV on FP8 tensor cores (FlashAttention-3's FP8 design).
    - "int8-fp8": Q, K in int8 (exact int32 QK^T), V and P in float8 e4m3 (SageAttention's design).

    granularity "head": one amax scale per (batch, head) for each of Q, K, V. "block": one scale per
    `block` tokens for Q and K, one per channel for V (the PV sum runs over tokens, so a per-channel scale
    factors out of it and costs one multiply in the epilogue).
    smooth_k subtracts K's mean over tokens before quantizing. Exact for softmax: q.(k - kbar) = q.k - q.kbar
    is a per-row constant that the softmax cancels; it removes K's shared offset, which would otherwise use
    up the quantization range (SageAttention, section 3.2).
    """

    precision: Precision = "bf16"
    granularity: Granularity = "block"
    block: int = 128  # tokens per Q / K scale when granularity == "block"
    smooth_k: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp8", "int8-fp8"):
            raise ConfigError(f"precision must be 'bf16', 'fp8' or 'int8-fp8', got {self.precision!r}")
        if self.granularity not in ("head", "block"):
            raise ConfigError(f"granularity must be 'head' or 'block', got {self.granularity!r}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ConfigError(f"block must be a power of two >= 16, got {self.block}")

    @property
    def quantized(self) -> bool:
        return self.precision != "bf16"

    @property
    def name(self) -> str:
        if not self.quantized:
            return "bf16"
        parts = [self.precision, self.granularity if self.granularity == "head" else f"block{self.block}"]
        return "-".join([*parts, "smoothk"] if self.smooth_k else parts)


# The named variants the processor, the benchmark and the tests use.
VARIANTS: dict[str, AttentionVariant] = {
    "bf16": AttentionVariant("bf16"),
    "fp8-head": AttentionVariant("fp8", "head", smooth_k=False),  # FlashAttention-3's per-head descales
    "fp8-block": AttentionVariant("fp8", "block", 128, smooth_k=True),
    "int8-fp8": AttentionVariant("int8-fp8", "block", 128, smooth_k=True),  # SageAttention-style
}


def resolve_variant(variant: str | AttentionVariant) -> AttentionVariant:
    """A variant by name (one of VARIANTS) or as given."""
    if isinstance(variant, AttentionVariant):
        return variant
    if variant not in VARIANTS:
        raise ConfigError(f"unknown attention variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[variant]

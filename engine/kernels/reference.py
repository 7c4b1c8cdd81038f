"""The torch references the kernel is measured against: exact attention in fp32, and the same attention on
Q/K/V after our quantize -> dequantize round trip. Their difference is the quantization error; the kernel's
difference from the second is the kernel's own error (P in fp8, accumulation order)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import dequantize_qkv, quantize_qkv
from .variants import AttentionVariant, resolve_variant


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V in fp32, no mask: [B, H, S, D] -> [B, H, S, D] fp32."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str | AttentionVariant = "bf16"
) -> torch.Tensor:
    """What the kernel computes, up to its own rounding: exact fp32 attention over the dequantized Q/K/V of
    `variant` (over the inputs themselves for bf16). [B, H, S, D] -> [B, H, S, D] fp32."""
    spec = resolve_variant(variant)
    if not spec.quantized:
        return exact_attention(q, k, v)
    return exact_attention(*dequantize_qkv(quantize_qkv(q, k, v, spec)))

"""Transformer weights stored in FP8, computed in bf16 (or in FP8 where the GPU has FP8 GEMMs).

Each Linear that backends.fp8.fp8_filter selects becomes an Fp8StorageLinear: its weight as
float8_e4m3fn with one float32 per-tensor scale (amax / 448), upcast to the input's dtype for each call
(one layer at a time, so the bf16 copy of one weight exists at once). The bias stays in bf16. Half the
bytes of bf16 weights; the error is E4M3's rounding of each weight (3 mantissa bits: a relative step of
2^-4), which tests/test_memory_mechanisms.py bounds.

The FP8 bytes are stored as integer views (uint8, and int32 for the scale), so `Module.to(dtype=...)`,
which casts every floating tensor, never casts them back to bf16.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..backends.fp8 import E4M3_MAX, fp8_linears, to_e4m3

log = logging.getLogger(__name__)


class Fp8StorageLinear(torch.nn.Module):
    """y = x (s W8)^T + b: W8 in E4M3 with one scale s. compute "bf16": W8 upcast per call; "fp8":
    torch._scaled_mm with the input quantized per tensor at each call (compute capability >= 8.9)."""

    weight_bits: torch.Tensor  # [N, K] uint8 view of float8_e4m3fn
    scale_bits: torch.Tensor  # [1] int32 view of the float32 scale

    def __init__(self, linear: torch.nn.Linear, compute: str = "bf16") -> None:
        super().__init__()
        w = linear.weight.detach()  # [N, K]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (w.abs().amax().float().clamp_min(1e-12) / E4M3_MAX).reshape(1)  # [1] float32
        self.register_buffer("weight_bits", to_e4m3(w, scale).view(torch.uint8))
        self.register_buffer("scale_bits", scale.view(torch.int32))
        self.bias = linear.bias
        self.compute = compute

    @property
    def scale(self) -> torch.Tensor:  # [1] float32
        return self.scale_bits.view(torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # [N, K]
        return (self.weight_bits.view(torch.float8_e4m3fn).to(torch.float32) * self.scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        if self.compute == "fp8" and x.is_cuda:
            return self._fp8_forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)  # [M, K]
        x_scale = (flat.abs().amax().float().clamp_min(1e-12) / E4M3_MAX).reshape(())
        y = torch._scaled_mm(
            to_e4m3(flat, x_scale),
            self.weight_bits.view(torch.float8_e4m3fn).t(),
            scale_a=x_scale,
            scale_b=self.scale.reshape(()),
            bias=None if self.bias is None else self.bias.to(x.dtype),
            out_dtype=x.dtype,
            use_fast_accum=True,
        )  # [M, N]
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        sides = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sides}, e4m3 storage, {self.compute} compute"


def store_fp8(transformer: torch.nn.Module, which: str = "all", compute: str = "bf16") -> int:
    """Replace every Linear `fp8_filter(which)` selects by an Fp8StorageLinear, in place, one at a time
    (the bf16 weight is freed as its FP8 copy is made). Returns how many."""
    names = fp8_linears(transformer, which)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, Fp8StorageLinear(getattr(parent, child), compute))
    log.info("FP8 storage: %d Linears (%s filter, %s compute)", len(names), which, compute)
    return len(names)

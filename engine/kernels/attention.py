"""engine.kernels.attention: our Triton attention over [B, H, S, D] tensors, in bf16 or with FP8 / INT8 Q/K/V.
Validates shapes, runs the quantization pre-pass (quant_kernel.py), picks a launch configuration and
launches the kernel: compiled for CUDA tensors, in Triton's interpreter (TRITON_INTERPRET=1) for CPU ones."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

from ..errors import BackendUnavailableError, ConfigError
from .kernel import TUNE_CONFIGS, attention_fwd
from .quant_kernel import quantize_qkv_fused
from .variants import FP8_MAX, AttentionVariant, resolve_variant

logger = logging.getLogger(__name__)

LOG2_E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)
# (mantissa bits, smallest normal exponent) of P's dtype in the bf16 variant, for the interpreter's rounding.
_P_GRID = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (0, 0)}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and pipeline depth of one launch (powers of two, so tiles and scale blocks nest)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ConfigError(f"{name} must be a power of two >= 16, got {value}")


# H100 defaults for D = 128 (FlashAttention-2/3 and Triton's tutorial use 128-row Q tiles with 8 warps):
# untuned on hardware so far; attention(..., autotune=True) measures kernel.TUNE_CONFIGS instead.
CUDA_DEFAULT = LaunchConfig(128, 64, num_warps=8, num_stages=3)
CUDA_DEFAULT_QUANT = LaunchConfig(128, 128, num_warps=8, num_stages=3)
# The interpreter runs one program at a time in numpy: bigger tiles mean fewer, larger numpy calls.
INTERPRETER_DEFAULT = LaunchConfig(64, 64, num_warps=4, num_stages=1)


def even_blocks(seq: int, block_m: int, block_n: int) -> dict[str, bool]:
    """The kernel's EVEN_M / EVEN_N constants: S is a multiple of the tile, so no bounds checks compile in.

    Computed here, in Python, and passed to the plain @triton.jit kernel: torch.compile's dynamo traces a
    launch of a JITFunction (or an Autotuner over one) into its graph; torch 2.11's dynamo does not know a
    `triton.heuristics` object and broke the graph in every attention call (docs/DESIGN-NOTES.md, 'The
    torch fast path'; tests/test_kernels.py traces the launch with dynamo).
    """
    return {"EVEN_M": seq % block_m == 0, "EVEN_N": seq % block_n == 0}


# Autotuning: one Autotuner per pattern of which tile sizes divide S, its configs carrying EVEN_M / EVEN_N.
_TUNE_BLOCKS = tuple(sorted({c.kwargs[k] for c in TUNE_CONFIGS for k in ("BLOCK_M", "BLOCK_N")}))


def _tune_configs(divides: dict[int, bool]) -> list[triton.Config]:
    return [
        triton.Config(
            {**c.kwargs, "EVEN_M": divides[c.kwargs["BLOCK_M"]], "EVEN_N": divides[c.kwargs["BLOCK_N"]]},
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for c in TUNE_CONFIGS
    ]


_AUTOTUNED = {
    flags: triton.autotune(
        _tune_configs(dict(zip(_TUNE_BLOCKS, flags, strict=True))), key=["S", "HEAD_DIM", "QUANT", "K_BLOCK"]
    )(attention_fwd)
    for flags in itertools.product((False, True), repeat=len(_TUNE_BLOCKS))
}
# Whether triton was imported under TRITON_INTERPRET=1 (a constant of the process: see interpreted()).
_INTERPRETED = not isinstance(attention_fwd, triton.runtime.JITFunction)


def interpreted() -> bool:
    """Whether the kernel was defined under Triton's interpreter (TRITON_INTERPRET=1 when triton was first
    imported). `@triton.jit` decides this once, at decoration time, for our kernel and for triton.language's
    own helpers (tl.sum, tl.zeros...), so a process runs either compiled kernels or interpreted ones."""
    return _INTERPRETED


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionVariant) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ConfigError(
            f"attention needs q, k, v of one shape [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[3] not in HEAD_DIMS:
        raise ConfigError(f"head dim must be one of {HEAD_DIMS}, got {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ConfigError(f"q, k, v must share one of {FLOAT_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device) or q.device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"q, k, v must be on one CUDA device or the CPU, got {q.device}, {k.device}, {v.device}"
        )
    if q.device.type == "cpu" and not interpreted():
        raise BackendUnavailableError(
            "CPU tensors run only in Triton's interpreter: start the process with TRITON_INTERPRET=1 "
            "(it must be set before triton is first imported), or pass CUDA tensors"
        )
    if q.device.type == "cuda" and interpreted():
        raise BackendUnavailableError(
            "this process runs Triton's interpreter (TRITON_INTERPRET=1): pass CPU tensors"
        )
    if spec.quantized and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ConfigError(
            f"variant {spec.name} needs FP8 tensor cores (compute capability >= 8.9); use 'bf16'"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str | AttentionVariant = "bf16",
    *,
    config: LaunchConfig | None = None,
    autotune: bool = False,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V over [B, H, S, D] tensors, no mask, non-causal; returns q's dtype and shape.

    `variant` is a name from VARIANTS ("bf16", "fp8-head", "fp8-block", "int8-fp8") or an AttentionVariant.
    Any strides are accepted (e.g. the [B, S, H, D] -> [B, H, S, D] view of a diffusers processor), and the
    output has q's memory layout. `config` fixes the tiles; `autotune` instead times kernel.TUNE_CONFIGS once
    per (S, D, variant) on CUDA. CPU tensors need a process started with TRITON_INTERPRET=1 and run in
    Triton's interpreter: correct, and slow.
    """
    spec = resolve_variant(variant)
    _check(q, k, v, spec)
    batch, heads, seq, head_dim = q.shape
    out = torch.empty_like(q)  # q's strides: a transposed view in gives a transposed view out
    on_cpu = q.device.type == "cpu"
    if spec.quantized:
        qkv = quantize_qkv_fused(q, k, v, spec)
        tensors = (qkv.q, qkv.k, qkv.v)
        scales = (qkv.q_scale, qkv.k_scale, qkv.v_scale)
        quant = 2 if spec.precision == "int8-fp8" else 1
        k_block = spec.block if spec.granularity == "block" else 0
        q_block, n_scales = qkv.block, qkv.q_scale.shape[-1]
    else:
        tensors = (q, k, v)
        dummy = torch.empty(1, dtype=torch.float32, device=q.device)
        scales = (dummy, dummy, dummy)
        quant, k_block, q_block, n_scales = 0, 0, seq, 1
    args: list[Any] = [*tensors, out, *scales]
    for t in (*tensors, out):
        args += list(t.stride())
    args += [heads, seq, n_scales, q_block, LOG2_E / math.sqrt(head_dim)]
    constants: dict[str, Any] = dict(
        HEAD_DIM=head_dim,
        K_BLOCK=k_block,
        QUANT=quant,
        P_SCALE=FP8_MAX,
        INTERPRETER=on_cpu,
        P_MANTISSA=_P_GRID[q.dtype][0],
        P_EMIN=_P_GRID[q.dtype][1],
    )

    if autotune and not on_cpu:
        divides = tuple(seq % b == 0 for b in _TUNE_BLOCKS)

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)

        _launch(q.device, _AUTOTUNED[divides][grid], args, constants)
        return out
    if config is None:
        config = INTERPRETER_DEFAULT if on_cpu else CUDA_DEFAULT_QUANT if spec.quantized else CUDA_DEFAULT
    constants.update(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **even_blocks(seq, config.block_m, config.block_n),
    )
    fixed_grid = ((seq + config.block_m - 1) // config.block_m, batch * heads)
    _launch(q.device, attention_fwd[fixed_grid], args, constants)
    return out


def _launch(
    device: torch.device, launch: Callable[..., Any], args: list[Any], constants: dict[str, Any]
) -> None:
    """Run one kernel launch on `device`. Eager CUDA launches go under that device (Triton launches on the
    current one); under torch.compile the launch is a node of the graph, which inductor runs under the
    graph's device, and dynamo would trace the device switch itself."""
    if device.type == "cpu" or torch.compiler.is_compiling():
        launch(*args, **constants)
    else:
        with torch.cuda.device(device):
            launch(*args, **constants)

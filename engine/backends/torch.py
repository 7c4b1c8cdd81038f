"""PyTorch backend: the diffusers transformer eager, under torch.compile, or with torchao FP8 Linears.

bf16 on CUDA and fp32 on the CPU unless told otherwise. FP8 (float8 dynamic activation and
weight, per row) needs compute capability >= 8.9 and quantizes the module in place. Thread
safety: forward under inference_mode mutates nothing, so threads may share one TorchDenoiser
(compile: warm each shape up on one thread first; compiling concurrently is not supported).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..buckets import ShapeKey
from ..errors import BackendUnavailableError, ConfigError
from . import named_inputs

log = logging.getLogger(__name__)

TORCH_MODES: tuple[str, ...] = ("eager", "compile", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
# Linears kept in high precision under FP8: embedders and the output head (ModelOpt's Flux recipe
# and the TensorRT demo keep the same set; proj_out included).
FP8_KEEP = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


class TorchDenoiser:
    """A torch module (eager or compiled) behind the Denoiser contract. Serves any shape."""

    shape_keys: frozenset[ShapeKey] | None = None

    def __init__(self, transformer: torch.nn.Module, name: str = "torch-eager") -> None:
        self.transformer = transformer
        self.name = name

    @torch.inference_mode()
    def __call__(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, 64]
        img_ids: torch.Tensor,  # [N + M, 3]
        encoder_hidden_states: torch.Tensor,  # [B, L, D_txt]
        txt_ids: torch.Tensor,  # [L, 3]
        pooled_projections: torch.Tensor,  # [B, D_pooled]
        timestep: torch.Tensor,  # [B]
        guidance: torch.Tensor,  # [B]
    ) -> torch.Tensor:  # [B, N + M, 64]
        inputs = named_inputs(
            hidden_states, img_ids, encoder_hidden_states, txt_ids, pooled_projections, timestep, guidance
        )
        return velocity(self.transformer, inputs)

    def close(self) -> None:
        """Nothing to free: the module belongs to the Components it came from."""


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def compile_blocks(transformer: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """A view of `transformer` whose repeated blocks are each torch.compile'd (regional compilation).

    Why regional: the 57 blocks of the 12B model are 2 block types, so dynamo compiles 2 small graphs
    per shape instead of one 57-block graph. On an H100 this compiled the full model in 20 s (bf16)
    and 12 s (FP8) per shape, where whole-model compiles take minutes (benchmarks/gpu_check.py).
    The returned module shares every parameter with `transformer`, which is left uncompiled: the
    eager model stays usable beside it (the benchmark's reference, the dispatch fallback).
    """
    view = copy.copy(transformer)  # a new Module object sharing parameters and buffers
    view._modules = dict(transformer._modules)  # its own child table, so the swaps below stay local
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if blocks is None:
            raise ConfigError(f"{type(transformer).__name__} has no {name}: not a Flux transformer")
        compiled = []
        for block in blocks:
            c = copy.copy(block)  # shares the block's submodules and weights
            c.compile(mode=mode, dynamic=False)  # sets c._compiled_call_impl only
            compiled.append(c)
        view._modules[name] = torch.nn.ModuleList(compiled)
    return view


def velocity(transformer: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel.forward on the Denoiser's keyword inputs -> [B, N + M, 64]."""
    return transformer(**inputs, return_dict=False)[0]


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def fp8_supported(capability: tuple[int, int] | None) -> bool:
    """torchao float8 dynamic kernels need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return capability is not None and tuple(capability) >= FP8_MIN_CAPABILITY


def fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """Which Linears FP8 quantizes: all but FP8_KEEP, and only with sides divisible by 16 (FP8 GEMMs)."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if any(part in FP8_KEEP for part in fqn.split(".")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def quantize_fp8(transformer: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Float8 dynamic activation + float8 weight (per row) on the Linears fp8_filter selects; in place."""
    cap = device_capability(device)
    if not fp8_supported(cap):
        raise BackendUnavailableError(
            f"torchao FP8 needs a CUDA GPU of compute capability >= 8.9; {device} has "
            f"{cap or 'none'}. Use mode='eager' or 'compile' (bf16) on this machine"
        )
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise BackendUnavailableError("torchao is not installed; `pip install 'kontext-engine[fp8]'`") from e
    quantize_(
        transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_filter
    )
    return transformer


def torch_denoiser(
    transformer: torch.nn.Module,
    *,
    mode: str = "eager",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compile_mode: str = "default",
) -> TorchDenoiser:
    """The transformer, moved to `device` and `dtype` (default: bf16 on CUDA, fp32 on CPU), as a Denoiser.

    mode: eager | compile (torch.compile, one graph per shape, dynamic=False) | fp8 (torchao float8,
    then compiled: float8 without compile is slower than bf16). The module is moved (and for fp8
    quantized) in place: it is shared with the Components it came from.
    compile_mode: torch.compile's mode. "default" because autotuning modes cost many minutes per shape
    on the 12B model (and did not finish a tiny FP8 test in 150 s on an H100). Compilation is regional
    (see compile_blocks).
    """
    if mode not in TORCH_MODES:
        raise ConfigError(f"torch mode must be one of {', '.join(TORCH_MODES)}, got {mode!r}")
    dev = torch.device(device) if device is not None else next(transformer.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "device cuda asked for, but torch sees no CUDA device; use device='cpu'"
        )
    dt = dtype or default_dtype(dev)
    transformer.to(device=dev, dtype=dt)
    module: Any = transformer
    if mode == "fp8":
        module = quantize_fp8(transformer, dev)
    if mode in ("compile", "fp8"):
        module = compile_blocks(module, compile_mode)
    name = f"torch-{mode}-{dtype_name(dt)}"
    log.info("torch denoiser %s on %s", name, dev)
    return TorchDenoiser(module, name=name)

"""PyTorch backend: the diffusers transformer eager, compiled, or FP8, with the levers of the fast path.

One frozen `TorchOptions` (torch_options.py) says which levers a torch denoiser pulls (fused QKV, our
attention kernel, static FP8 scales, CUDA graphs, dynamic-shape compile, a persistent compile cache) and
`torch_denoiser` applies them; the FP8 code is fp8.py. bf16 on CUDA and fp32 on the CPU unless told
otherwise. FP8 needs compute capability >= 8.9. Levers that change modules (FP8, fused QKV, the attention
kernel) change the module they are given, in place: a caller that must keep the original (the benchmark)
passes `weight_sharing_copy(...)`.
Thread safety: forward under inference_mode mutates nothing, so threads may share one TorchDenoiser;
with CUDA graphs, replays are serialized by a lock (one set of static buffers per shape).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailableError, ConfigError
from . import DenoiserBase
from .fp8 import quantize_fp8, quantize_static
from .stages import TorchStages
from .torch_options import KERNEL_PREFIX, TorchOptions, check_options

if TYPE_CHECKING:
    from ..model.components import Components

log = logging.getLogger(__name__)

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class TorchDenoiser(DenoiserBase):
    """A torch module (eager or compiled, optionally replayed as CUDA graphs) behind the Denoiser contract.

    Serves any shape. close() frees nothing: the module belongs to whoever passed it in.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        name: str = "torch-eager",
        *,
        call: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        compile_cache: Path | None = None,
        cache_loaded: bool | None = None,
    ) -> None:
        self.transformer = transformer
        self.name = name
        self._call = call or (lambda inputs: velocity(transformer, inputs))
        self.compile_cache = compile_cache
        self.cache_loaded = cache_loaded  # the compile cache's blob was read at load (None: no cache)
        # The split forward for step caches (caching/stages.py); a CUDA-graph replay (a `call`) is one
        # capture of the whole forward, so it has none: residual caches refuse it in one line.
        self.stages: TorchStages | None = TorchStages(transformer) if call is None else None

    @torch.inference_mode()
    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # DENOISER_INPUTS -> [B, N + M, 64]
        return self._call(inputs)

    def save_compile_cache(self) -> Path | None:
        """Write what torch compiled so far to the compile cache (after warm-up); None without a cache."""
        if self.compile_cache is None:
            return None
        from .compile_cache import save_compile_cache

        return save_compile_cache(self.compile_cache)


def velocity(transformer: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel.forward on the Denoiser's keyword inputs -> [B, N + M, 64].
    A model without a guidance embedding (guidance_embeds=False) is given guidance=None, as diffusers does."""
    if not getattr(getattr(transformer, "config", None), "guidance_embeds", True):
        inputs = {**inputs, "guidance": None}  # type: ignore[dict-item]
    return transformer(**inputs, return_dict=False)[0]


# --------------------------------------------------------------------------- module copies and compile


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose every parameter and buffer IS the original's (no tensor is copied).

    Levers that replace submodules or weights (FP8 swaps each Linear's weight, fused QKV adds Linears,
    the attention kernel swaps processors) then change only the copy: the original keeps its modules
    and its bf16 weights. Costs no device memory until a lever allocates new weights.
    """
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def compile_blocks(
    transformer: torch.nn.Module, mode: str = "default", dynamic: bool = False, freeze: bool = False
) -> torch.nn.Module:
    """A view of `transformer` whose repeated blocks are each torch.compile'd (regional compilation).

    Why regional: the 57 blocks of the 12B model are 2 block types, so dynamo compiles 2 small graphs
    per shape instead of one 57-block graph, where a whole-model compile takes minutes (the measured
    compile times are in docs/hardware.md).
    dynamic: one graph with symbolic sequence lengths for every shape of a family (else one per shape).
    freeze: inductor's freezing (weights folded in as constants; on a CPU, prepacked for oneDNN).
    The returned module shares every parameter with `transformer`, which is left uncompiled.
    """
    kwargs = compile_kwargs(mode, freeze)
    _raise_recompile_limit(RECOMPILE_LIMIT)
    view = copy.copy(transformer)  # a new Module object sharing parameters and buffers
    view._modules = dict(transformer._modules)  # its own child table, so the swaps below stay local
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if blocks is None:
            raise ConfigError(f"{type(transformer).__name__} has no {name}: not a Flux transformer")
        compiled = []
        for block in blocks:
            c = copy.copy(block)  # shares the block's submodules and weights
            c.compile(dynamic=dynamic, **kwargs)  # sets c._compiled_call_impl only
            compiled.append(c)
        if name == "single_transformer_blocks" and compiled:
            compiled[0] = JointSlices(compiled[0])
        view._modules[name] = torch.nn.ModuleList(compiled)
    return view


def compile_kwargs(mode: str, freeze: bool) -> dict[str, Any]:
    """torch.compile's mode, or, with freezing, that mode's inductor options plus freezing (torch.compile
    takes a mode or options, not both)."""
    if not freeze:
        return {"mode": mode}
    options = {} if mode == "default" else dict(torch._inductor.list_mode_options(mode))
    return {"options": {**options, "freezing": True}}


class JointSlices(torch.nn.Module):
    """The first single-stream block, given its two streams as slices of one [B, L + N, D] tensor: the
    layout diffusers' single block returns, so the layout every later single block receives.

    Without it the first block's contiguous inputs (from the last double block) fail the stride guards
    of the graph the later blocks share, and the single block compiles twice per shape (docs/DESIGN-NOTES.md,
    'The torch fast path'; tests/test_torch_backend.py counts the compiles).
    Costs one concatenation per step, outside the compiled block (which concatenates the two anyway).
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N, D]
        encoder_hidden_states: torch.Tensor,  # [B, L, D]
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, L, D], [B, N, D])
        text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, L + N, D]
        return self.block(joint[:, text:], joint[:, :text], *args, **kwargs)


# Dynamo keeps the graphs of one block type on its forward's code object, one per (shape, weight type,
# module structure): bf16, FP8, static FP8 and fused-QKV blocks at 9 shape keys exceed torch's default
# of 8, after which it silently runs the block eagerly. Raised for the process (a torch global).
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def compile_vae(vae: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """A view of diffusers' AutoencoderKL whose encoder and decoder are compiled; shares every weight."""
    view = copy.copy(vae)
    view._modules = dict(vae._modules)
    for name in ("encoder", "decoder"):
        c = copy.copy(getattr(vae, name))
        c.compile(mode=mode, dynamic=False)
        view._modules[name] = c
    return view


def with_vae_lever(components: Components, compile: bool) -> Components:
    """The `vae` lever (TorchOptions.compile_vae), applied here once for engine.load and the bench:
    `components` with compile_vae's VAE when `compile`, else `components` itself."""
    return dataclasses.replace(components, vae=compile_vae(components.vae)) if compile else components


# --------------------------------------------------------------------------- dtypes


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# --------------------------------------------------------------------------- structural levers


def fuse_qkv(transformer: torch.nn.Module) -> torch.nn.Module:
    """One q|k|v Linear per attention (and one for the text stream's added q|k|v), in place.

    diffusers' fuse_projections concatenates the weights into new Linears and leaves the old ones
    attached; we detach them so that FP8 does not quantize weights nothing reads.
    """
    for module in transformer.modules():
        fuse = getattr(module, "fuse_projections", None)
        if fuse is None or getattr(module, "fused_projections", False):
            continue
        with torch.no_grad():
            fuse()
        if not getattr(module, "fused_projections", False):
            continue
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            if name in module._modules and _fused_partner(module, name):
                del module._modules[name]
    return transformer


def _fused_partner(module: torch.nn.Module, name: str) -> bool:
    return hasattr(module, "to_added_qkv" if name.startswith("add_") else "to_qkv")


def use_kernel_attention(transformer: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Swap our Triton attention (engine.kernels) into every attention processor of `transformer`."""
    try:
        from ..kernels import use_kernel_attention as swap
    except ImportError as e:
        raise BackendUnavailableError(
            f"attention={variant!r} needs engine.kernels.use_kernel_attention, which is not importable "
            f"here ({e}); use attention='sdpa'"
        ) from e
    swap(transformer, variant=variant)
    return transformer


# --------------------------------------------------------------------------- the denoiser


def torch_denoiser(
    transformer: torch.nn.Module,
    *,
    mode: str = "eager",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    options: TorchOptions | None = None,
    amax: Mapping[str, float] | None = None,
) -> TorchDenoiser:
    """The transformer, moved to `device` and `dtype` (default: bf16 on CUDA, fp32 on CPU), as a Denoiser.

    mode: eager | compile (regional torch.compile) | fp8 (FP8 Linears, then compiled: FP8 without
    compile was slower than bf16 eager on the one GPU it ran on, docs/hardware.md). Levers that change modules
    change `transformer` in place (pass `weight_sharing_copy(t)` to keep `t`). amax: per-Linear input
    amax from `engine.calibration.calibrate_amax`, needed by options.fp8_scales == "static".
    """
    options = options or TorchOptions()
    check_options(mode, options)
    dev = torch.device(device) if device is not None else next(transformer.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "device cuda asked for, but torch sees no CUDA device; use device='cpu'"
        )
    if options.cuda_graphs and dev.type != "cuda":
        raise BackendUnavailableError(f"CUDA graphs need a CUDA device, not {dev}; drop the graphs lever")
    dt = dtype or default_dtype(dev)
    transformer.to(device=dev, dtype=dt)
    module: Any = transformer
    if options.fused_qkv:
        module = fuse_qkv(module)
    if mode == "fp8":
        if options.fp8_scales == "static":
            if amax is None:
                raise ConfigError(
                    "static FP8 scales need calibrated activation amax: "
                    "engine.calibration.calibrate_amax(components, device=..., dtype=...)"
                )
            module = quantize_static(module, amax, dev, options.fp8_filter)
        else:
            module = quantize_fp8(module, dev, options.fp8_filter)
    if options.attention != "sdpa":
        module = use_kernel_attention(module, options.attention.removeprefix(KERNEL_PREFIX))
    loaded = None
    if options.compile_cache is not None and mode != "eager":
        from .compile_cache import load_compile_cache

        loaded = load_compile_cache(options.compile_cache)
    if mode in ("compile", "fp8"):
        module = compile_blocks(module, options.compile_mode, options.dynamic, options.freeze)
    call = None
    if options.cuda_graphs:
        from .cuda_graphs import GraphedCall

        compiled = module
        call = GraphedCall(lambda inputs: velocity(compiled, inputs))
    name = "+".join((f"torch-{mode}-{dtype_name(dt)}", *options.levers))  # torch-fp8-bf16+qkv+graphs
    log.info("torch denoiser %s on %s", name, dev)
    cache = options.compile_cache if mode != "eager" else None
    return TorchDenoiser(module, name=name, call=call, compile_cache=cache, cache_loaded=loaded)

"""PyTorch backend: the diffusers transformer eager, compiled, or FP8, with the levers of the fast path.

One frozen `TorchOptions` says which levers a torch denoiser pulls (fused QKV, our attention kernel,
static FP8 scales, CUDA graphs, dynamic-shape compile, a persistent compile cache) and `torch_denoiser`
applies them. bf16 on CUDA and fp32 on the CPU unless told otherwise. FP8 needs compute capability
>= 8.9. Levers that change modules (FP8, fused QKV, the attention kernel) change the module they are
given, in place: a caller that must keep the original (the benchmark) passes `weight_sharing_copy(...)`.
Thread safety: forward under inference_mode mutates nothing, so threads may share one TorchDenoiser;
with CUDA graphs, replays are serialized by a lock (one set of static buffers per shape).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..buckets import ShapeKey
from ..errors import BackendUnavailableError, ConfigError
from . import named_inputs

log = logging.getLogger(__name__)

TORCH_MODES: tuple[str, ...] = ("eager", "compile", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
# Linears kept in high precision under every FP8 filter: embedders and the output head (ModelOpt's Flux
# recipe and the TensorRT demo keep the same set; proj_out included).
FP8_KEEP = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
# The two FP8 filters the GPU benchmark measures side by side (docs/DESIGN-NOTES.md, "FP8 recipe"):
#   tokens: also keep the modulation Linears (`norm1.linear`, `norm1_context.linear`, `norm.linear`) in
#           bf16. They act on one row per image ([B, 3072] -> 6 x 3072): FP8 saves nothing on a GEMV
#           but quantizes the shift/scale/gate of every block. 3.2B of the 12B weights.
#   all:    every Linear of the blocks.
FP8_FILTERS: tuple[str, ...] = ("tokens", "all")
FP8_SCALES: tuple[str, ...] = ("dynamic", "static")  # torchao per-row per call | calibrated per tensor
# attention: "sdpa" (torch), or "kernel-<variant>" for engine.kernels' Triton attention, whose variants
# (bf16, fp8-head, fp8-block, int8-fp8 ...) that package names and checks.
KERNEL_PREFIX = "kernel-"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass(frozen=True)
class TorchOptions:
    """The levers of the torch path. The defaults are the recipe `engine.load(torch_mode=...)` ships."""

    fp8_filter: str = "tokens"  # fp8 mode: which Linears (FP8_FILTERS)
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
    if mode == "eager" and (options.dynamic or options.compile_mode != defaults.compile_mode):
        raise ConfigError("dynamic and compile_mode apply to the compile and fp8 modes, not eager")


class TorchDenoiser:
    """A torch module (eager or compiled, optionally replayed as CUDA graphs) behind the Denoiser contract.

    Serves any shape.
    """

    shape_keys: frozenset[ShapeKey] | None = None

    def __init__(
        self,
        transformer: torch.nn.Module,
        name: str = "torch-eager",
        *,
        call: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        compile_cache: Path | None = None,
    ) -> None:
        self.transformer = transformer
        self.name = name
        self._call = call or (lambda inputs: velocity(transformer, inputs))
        self.compile_cache = compile_cache

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
        return self._call(inputs)

    def save_compile_cache(self) -> Path | None:
        """Write what torch compiled so far to the compile cache (after warm-up); None without a cache."""
        if self.compile_cache is None:
            return None
        from .compile_cache import save_compile_cache

        return save_compile_cache(self.compile_cache)

    def close(self) -> None:
        """Nothing to free: the module belongs to whoever passed it in."""


def velocity(transformer: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel.forward on the Denoiser's keyword inputs -> [B, N + M, 64]."""
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
    transformer: torch.nn.Module, mode: str = "default", dynamic: bool = False
) -> torch.nn.Module:
    """A view of `transformer` whose repeated blocks are each torch.compile'd (regional compilation).

    Why regional: the 57 blocks of the 12B model are 2 block types, so dynamo compiles 2 small graphs
    per shape instead of one 57-block graph. On an H100 this compiled the full model in 20 s (bf16)
    and 12 s (FP8) per shape, where whole-model compiles take minutes (2026-11-27, benchmarks/results).
    dynamic: one graph with symbolic sequence lengths for every shape of a family (else one per shape).
    The returned module shares every parameter with `transformer`, which is left uncompiled.
    """
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
            c.compile(mode=mode, dynamic=dynamic)  # sets c._compiled_call_impl only
            compiled.append(c)
        view._modules[name] = torch.nn.ModuleList(compiled)
    return view


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


# --------------------------------------------------------------------------- FP8


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def fp8_supported(capability: tuple[int, int] | None) -> bool:
    """FP8 tensor-core GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return capability is not None and tuple(capability) >= FP8_MIN_CAPABILITY


def is_modulation(fqn: str) -> bool:
    """The AdaLN modulation Linears of the blocks: `norm1.linear`, `norm1_context.linear`, `norm.linear`."""
    parts = fqn.split(".")
    return len(parts) >= 2 and parts[-1] == "linear" and parts[-2].startswith("norm")


def fp8_filter(module: torch.nn.Module, fqn: str, which: str = "tokens") -> bool:
    """Which Linears FP8 quantizes (see FP8_FILTERS): never FP8_KEEP, only sides divisible by 16."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if any(part in FP8_KEEP for part in fqn.split(".")):
        return False
    if which == "tokens" and is_modulation(fqn):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_linears(transformer: torch.nn.Module, which: str = "tokens") -> list[str]:
    """Names of the Linears `fp8_filter(which)` selects, in module order."""
    return [n for n, m in transformer.named_modules() if fp8_filter(m, n, which)]


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


def quantize_fp8(
    transformer: torch.nn.Module, device: torch.device, which: str = "tokens"
) -> torch.nn.Module:
    """torchao float8 dynamic activations + float8 weights, per row, on the Linears fp8_filter selects;
    in place.

    set_inductor_config=False keeps inductor's defaults: torchao's own settings (coordinate-descent
    tuning) multiplied compile time, and the 225 ms H100 figure was measured without them.
    """
    require_fp8(device)
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise BackendUnavailableError("torchao is not installed; `pip install 'kontext-engine[fp8]'`") from e
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=lambda m, fqn: fp8_filter(m, fqn, which))
    return transformer


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
        from .. import kernels  # type: ignore[attr-defined]

        swap = kernels.use_kernel_attention
    except (ImportError, AttributeError) as e:
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
    compile_mode: str | None = None,
) -> TorchDenoiser:
    """The transformer, moved to `device` and `dtype` (default: bf16 on CUDA, fp32 on CPU), as a Denoiser.

    mode: eager | compile (regional torch.compile) | fp8 (FP8 Linears, then compiled: FP8 without
    compile is slower than bf16: 498 vs 384 ms per 1024² forward on an H100). Levers that change modules
    change `transformer` in place (pass `weight_sharing_copy(t)` to keep `t`). amax: per-Linear input
    amax from `fp8_static.calibrate_amax`, needed by options.fp8_scales == "static".
    compile_mode: overrides options.compile_mode (kept for callers of the earlier signature).
    """
    options = options or TorchOptions()
    if compile_mode is not None:
        options = replace(options, compile_mode=compile_mode)
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
            from .fp8_static import quantize_static

            if amax is None:
                raise ConfigError(
                    "static FP8 scales need calibrated activation amax: "
                    "engine.backends.fp8_static.calibrate_amax(components, device=..., dtype=...)"
                )
            module = quantize_static(module, amax, dev, options.fp8_filter)
        else:
            module = quantize_fp8(module, dev, options.fp8_filter)
    if options.attention != "sdpa":
        module = use_kernel_attention(module, options.attention.removeprefix(KERNEL_PREFIX))
    if options.compile_cache is not None and mode != "eager":
        from .compile_cache import load_compile_cache

        load_compile_cache(options.compile_cache)
    if mode in ("compile", "fp8"):
        module = compile_blocks(module, options.compile_mode, options.dynamic)
    call = None
    if options.cuda_graphs:
        from .cuda_graphs import GraphedCall

        compiled = module
        call = GraphedCall(lambda inputs: velocity(compiled, inputs))
    name = "+".join((f"torch-{mode}-{dtype_name(dt)}", *options.levers))  # torch-fp8-bf16+qkv+graphs
    log.info("torch denoiser %s on %s", name, dev)
    cache = options.compile_cache if mode != "eager" else None
    return TorchDenoiser(module, name=name, call=call, compile_cache=cache)

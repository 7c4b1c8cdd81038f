"""TensorRT plans: one plan per (precision, bucket family), one static profile per shape key.

The pure functions (availability, capability checks, profile shapes, plan names) are tested on
any machine; `build_plan` calls TensorRT 10's builder and is only reached after
`check_tensorrt()` has found a real TensorRT and a CUDA device.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..buckets import ShapeKey
from ..errors import BackendUnavailableError, BuildError
from .manifest import atomic_write_bytes

log = logging.getLogger(__name__)

# Minimum compute capability per recipe mode: FP8 tensor cores arrive with Ada (8.9) and Hopper.
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fp8": (8, 9), "int8": (7, 5), "bf16": (8, 0)}


@dataclass(frozen=True)
class TensorRTOptions:
    """Builder settings recorded in the manifest (and part of the compile stage's hash)."""

    opt_level: int = 3  # builder_optimization_level; 3 for Flux "to reduce GPU memory" (NVIDIA demo)
    workspace_gb: float = 8.0
    extra_memory_target: float = 0.0  # ask for no extra weight memory per extra profile (a hint)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.workspace_gb <= 0:
            raise BuildError(f"--workspace-gb must be positive, got {self.workspace_gb}")
        if not 0.0 <= self.extra_memory_target <= 1.0:
            raise BuildError(f"extra_memory_target must be in [0, 1], got {self.extra_memory_target}")


def tensorrt_module() -> ModuleType | None:
    """The real TensorRT Python module, or None. tensorrt-stubs alone imports as an empty namespace."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt if hasattr(trt, "Builder") and hasattr(trt, "__version__") else None


def tensorrt_available() -> bool:
    return tensorrt_module() is not None


def cuda_device() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of CUDA device 0, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


def check_tensorrt() -> tuple[ModuleType, str, tuple[int, int]]:
    """TensorRT, the GPU name and its capability; CUDA is checked before TensorRT is touched."""
    device = cuda_device()
    if device is None:
        raise BackendUnavailableError(
            "the tensorrt backend needs a CUDA device and torch sees none; "
            "use --backend onnxruntime (or auto) on this machine"
        )
    trt = tensorrt_module()
    if trt is None:
        raise BackendUnavailableError(
            "TensorRT is not installed (tensorrt-stubs alone does not count); "
            "`pip install -e '.[trt]'` on a GPU machine, or use --backend onnxruntime"
        )
    return trt, device[0], device[1]


def check_capability(mode: str | None, capability: tuple[int, int], gpu: str = "this GPU") -> None:
    """Refuse a recipe the GPU has no kernels for (FP8 below compute capability 8.9)."""
    need = MIN_CAPABILITY.get(mode or "")
    if need is not None and tuple(capability) < need:
        raise BuildError(
            f"{mode} needs compute capability >= {need[0]}.{need[1]}, but {gpu} is "
            f"{capability[0]}.{capability[1]}; build int8 or bf16 instead "
            f"(--precision int8)"
        )


def profile_shapes(
    key: ShapeKey, in_channels: int, joint_dim: int, pooled_dim: int
) -> dict[str, tuple[int, ...]]:
    """Input name -> static shape of one shape key (the profile's min = opt = max)."""
    n, b, l = key.image_tokens, key.batch, key.text_tokens  # noqa: E741
    return {
        "hidden_states": (b, n, in_channels),
        "img_ids": (n, 3),
        "encoder_hidden_states": (b, l, joint_dim),
        "txt_ids": (l, 3),
        "pooled_projections": (b, pooled_dim),
        "timestep": (b,),
        "guidance": (b,),
    }


def family_profiles(keys: Sequence[ShapeKey] | frozenset[ShapeKey]) -> dict[str, int]:
    """Shape key string -> profile index, in sorted key order (the manifest's `profiles`)."""
    return {str(k): i for i, k in enumerate(sorted(keys))}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def plan_name(precision: str, family: str, trt_version: str, gpu: str) -> str:
    """'transformer_fp8_1mp_trt10.13.0_nvidia-h100-80gb-hbm3.plan': what the plan is valid for."""
    return f"transformer_{precision}_{_slug(family)}_trt{_slug(trt_version)}_{_slug(gpu)}.plan"


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    keys: Sequence[ShapeKey],
    dims: tuple[int, int, int],
    mode: str | None,
    options: TensorRTOptions,
    timing_cache: Path,
) -> dict[str, Any]:
    """Build a strongly typed plan from the (Q/DQ) graph with one static profile per key.

    dims: (in_channels, joint_attention_dim, pooled_projection_dim). Returns what the manifest
    records (versions, GPU, profiles, build time). The timing cache persists across builds.
    """
    trt, gpu, capability = check_tensorrt()
    check_capability(mode, capability, gpu)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(
            f"TensorRT could not parse {onnx_path.name}: {errors}. Rebuild the ONNX with --force"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profiles = family_profiles(keys)
    for key_str, _ in sorted(profiles.items(), key=lambda kv: kv[1]):
        key = next(k for k in keys if str(k) == key_str)
        profile = builder.create_optimization_profile()
        for name, shape in profile_shapes(key, *dims).items():
            profile.set_shape(name, shape, shape, shape)
        profile.extra_memory_target = options.extra_memory_target
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            "TensorRT failed to build the plan (see its log above); try --workspace-gb larger "
            "or --opt-level 2"
        )
    atomic_write_bytes(plan_path, bytes(serialized))
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu": gpu,
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "build_seconds": time.perf_counter() - t0,
        "profiles": profiles,
    }


class PlanRunner:
    """Runs a plan's profile on numpy inputs (verification only; the runtime lives in backends/)."""

    def __init__(self, plan_path: Path) -> None:
        import torch

        trt, _, _ = check_tensorrt()
        self.trt = trt
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise BuildError(
                f"TensorRT could not load {plan_path.name} (other TensorRT version or GPU?); "
                "rebuild with `kontext build --force`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def run(self, profile: int, inputs: dict[str, Any]) -> Any:
        torch, trt = self.torch, self.trt
        ctx = self.context
        ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
        keep = []
        for name, array in inputs.items():
            t = torch.from_numpy(array).cuda().contiguous()
            t = t.to(_torch_dtype(torch, trt, self.engine.get_tensor_dtype(name)))
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        out_name = "velocity"
        shape = tuple(ctx.get_tensor_shape(out_name))
        out = torch.empty(
            shape, dtype=_torch_dtype(torch, trt, self.engine.get_tensor_dtype(out_name)), device="cuda"
        )
        ctx.set_tensor_address(out_name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the input copies ran on the current stream
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise BuildError("TensorRT execution failed (see its log); rebuild with --force")
        self.stream.synchronize()
        return out.float().cpu().numpy()


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
    }
    return table[dtype]

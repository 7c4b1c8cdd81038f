"""TensorRT plans: one strongly typed plan per (precision, bucket family), its profiles static or dynamic.

dynamic (the default): one profile for the family (min and max over its shape keys, opt at the
1024x1024 key), so the plan holds one copy of the weights; the runtime still keeps one context per
shape key for CUDA graphs. static: one profile per key (min = opt = max); TensorRT shares weights
across profiles only as a hint (extra_memory_target). `benchmarks/trt_first_run.py` measures both.
`build_plan` is reached only after `require_tensorrt()` found a real TensorRT and a CUDA device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..backends.fp8 import FP8_MIN_CAPABILITY
from ..backends.tensorrt_plans import cuda_device, family_profiles, profile_shapes, require_tensorrt
from ..buckets import ShapeKey
from ..config import TransformerConfig
from ..errors import BuildError
from ..files import atomic_write_bytes
from ..manifest import PROFILE_MODES

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

# Minimum compute capability per recipe mode: FP8 tensor cores arrive with Ada (8.9) and Hopper.
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fp8": FP8_MIN_CAPABILITY, "int8": (7, 5)}


@dataclass(frozen=True)
class TensorRTOptions:
    """Builder settings recorded in the manifest (and part of the compile stage's hash)."""

    profiles: str = "dynamic"  # "dynamic": one profile per family; "static": one per shape key
    opt_level: int = 3  # builder_optimization_level; 3 for Flux "to reduce GPU memory" (NVIDIA demo)
    workspace_gb: float = 8.0
    extra_memory_target: float = 0.0  # static: ask for no extra weight memory per extra profile (a hint)
    weight_streaming: bool = False  # BuilderFlag.WEIGHT_STREAMING: a memory plan may stream the weights

    def __post_init__(self) -> None:
        if self.profiles not in PROFILE_MODES:
            raise BuildError(f"--profiles must be one of {', '.join(PROFILE_MODES)}, got {self.profiles!r}")
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.workspace_gb <= 0:
            raise BuildError(f"--workspace-gb must be positive, got {self.workspace_gb}")
        if not 0.0 <= self.extra_memory_target <= 1.0:
            raise BuildError(f"extra_memory_target must be in [0, 1], got {self.extra_memory_target}")


def check_capability(mode: str | None, capability: tuple[int, int], gpu: str = "this GPU") -> None:
    """Refuse a recipe the GPU has no kernels for (FP8 below compute capability 8.9)."""
    need = MIN_CAPABILITY.get(mode or "")
    if need is not None and tuple(capability) < need:
        raise BuildError(
            f"{mode} needs compute capability >= {need[0]}.{need[1]}, but {gpu} is "
            f"{capability[0]}.{capability[1]}; build int8 instead (--precision int8)"
        )


def allows_tf32(mode: str | None, high_precision_dtype: str) -> bool:
    """TensorRT runs fp32 GEMMs in TF32 unless told not to (BuilderFlag.TF32 is on by default). The
    fp32 recipe clears it, so its plan is held to the fp32 bound (1e-4 rel L2); quantized recipes keep
    it for their high-precision layers, whose bounds are 100x looser."""
    return not (mode is None and high_precision_dtype == "fp32")


def set_timing_cache(config: trt.IBuilderConfig, cache_path: Path) -> bool:
    """Give the builder the timing cache at `cache_path`, or a fresh one when TensorRT refuses it
    (another GPU or TensorRT version, or a corrupt file): that file is deleted before the build, so
    the cache written after it is this machine's. Returns whether the old cache was used."""
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except RuntimeError as e:  # a file TensorRT cannot parse
            log.warning("the timing cache %s is unreadable (%s); starting a new one", cache_path, e)
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        log.warning(
            "TensorRT refused the timing cache %s (another GPU or TensorRT version?); "
            "deleting it and starting a new one",
            cache_path,
        )
        cache_path.unlink(missing_ok=True)
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise BuildError("TensorRT refused a new, empty timing cache; rebuild into a fresh --build folder")
    return False


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    *,
    cfg: TransformerConfig,
    keys: Sequence[ShapeKey],
    family: str,
    mode: str | None,
    tf32: bool,
    options: TensorRTOptions,
    timing_cache: Path,
) -> None:
    """Build a strongly typed plan from the (Q/DQ) graph, with the profiles `options.profiles` says,
    and write it to `plan_path` (atomically, from TensorRT's buffer without a host copy). mode: the
    recipe's quantization (checked against the GPU); tf32: see allows_tf32. The timing cache persists
    across builds."""
    trt_module = require_tensorrt()
    import tensorrt as trt

    device = cuda_device()
    if device is not None:
        check_capability(mode, device[1], device[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(
            f"TensorRT could not parse {onnx_path.name}: {errors}. Rebuild the ONNX with --force"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    set_timing_cache(config, timing_cache)
    if options.weight_streaming:
        from ..backends.tensorrt_streaming import enable_weight_streaming

        enable_weight_streaming(config, trt)
    profiles = family_profiles(keys, options.profiles)
    for index in sorted(set(profiles.values())):
        profile = builder.create_optimization_profile()
        served = [k for k in keys if profiles[str(k)] == index]
        for name, (lo, opt, hi) in profile_shapes(cfg, served, family).items():
            profile.set_shape(name, lo, opt, hi)
        profile.extra_memory_target = options.extra_memory_target
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            "TensorRT failed to build the plan (see its log above); "
            "try --workspace-gb larger or --opt-level 2"
        )
    atomic_write_bytes(plan_path, memoryview(serialized))  # IHostMemory is a buffer: no 12 GB copy
    cache = config.get_timing_cache()
    if cache is not None:
        atomic_write_bytes(timing_cache, memoryview(cache.serialize()))
    log.info(
        "TensorRT %s: wrote %s (%d profile(s))",
        trt_module.__version__,
        plan_path.name,
        len(set(profiles.values())),
    )

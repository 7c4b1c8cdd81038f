"""Compile stage: pick the backend, then ONNX -> ONNX Runtime optimized model or TensorRT plan.

ONNX Runtime artifacts are the graph after ORT's offline optimizations (CPU execution provider),
saved with the options that load them (`runtime_options`, recorded in the manifest).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, BuildError, ConfigError
from .quantize import ORT_FP8_DISABLED_OPTIMIZERS, Recipe
from .tensorrt_build import cuda_device, tensorrt_module

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime")
ORT_LEVEL = "ORT_ENABLE_EXTENDED"  # hardware-independent fusions; ENABLE_ALL adds layout changes


def choose_backend(requested: str) -> tuple[str, str]:
    """('tensorrt' | 'onnxruntime', why). auto: TensorRT when it imports AND a CUDA device exists."""
    if requested not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    device = cuda_device()
    has_trt = tensorrt_module() is not None
    if requested == "tensorrt":
        if device is None or not has_trt:
            missing = "a CUDA device" if device is None else "TensorRT (`pip install -e '.[trt]'`)"
            raise BackendUnavailableError(f"--backend tensorrt needs {missing}; use --backend onnxruntime")
        return "tensorrt", f"requested; GPU {device[0]}"
    if requested == "onnxruntime":
        return "onnxruntime", "requested"
    if device is not None and has_trt:
        return "tensorrt", f"auto: TensorRT and GPU {device[0]} found"
    why = "no CUDA device" if device is None else "TensorRT is not installed"
    return "onnxruntime", f"auto: {why}, building ONNX Runtime (CPU) artifacts"


def backend_version(backend: str) -> str:
    if backend == "tensorrt":
        trt = tensorrt_module()
        return str(trt.__version__) if trt is not None else "missing"
    import onnxruntime as ort

    return str(ort.__version__)


def ort_runtime_options(recipe: Recipe) -> dict[str, Any]:
    """SessionOptions an ORT artifact of this recipe loads with (the build verifies with these too).

    FP8 Q/DQ: ORT 1.31's CPU QDQ fusions turn FP8 DequantizeLinear + MatMul into integer ops
    that reject float8 inputs, so those transformers are disabled (FP8 then runs emulated).
    """
    disabled = list(ORT_FP8_DISABLED_OPTIMIZERS) if recipe.mode == "fp8" else []
    return {
        "providers": ["CPUExecutionProvider"],
        "graph_optimization_level": ORT_LEVEL,
        "disabled_optimizers": disabled,
    }


def ort_session(path: Path, runtime_options: dict[str, Any], threads: int = 0) -> Any:
    """An InferenceSession of an ORT artifact loaded as its manifest entry says."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, runtime_options["graph_optimization_level"]
    )
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(
        str(path),
        so,
        providers=runtime_options["providers"],
        disabled_optimizers=runtime_options.get("disabled_optimizers") or None,
    )


def compile_onnxruntime(src: Path, dst: Path, recipe: Recipe) -> dict[str, Any]:
    """Optimize `src` offline for ONNX Runtime's CPU provider into `dst` (atomically).

    Returns the artifact's runtime_options.
    """
    import onnxruntime as ort

    if recipe.tensorrt_only:
        raise BuildError(
            f"recipe {recipe.name} has no ONNX Runtime artifact (no useful CPU kernels); "
            "build fp32 or int8 on this machine"
        )
    opts = ort_runtime_options(recipe)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".compile-"))
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opts["graph_optimization_level"])
        so.optimized_model_filepath = str(tmp / dst.name)
        so.log_severity_level = 3
        big = sum(f.stat().st_size for f in src.parent.glob(src.name + "*")) > 1_800_000_000
        if big:
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", dst.name + ".data"
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
        try:
            ort.InferenceSession(
                str(src),
                so,
                providers=opts["providers"],
                disabled_optimizers=opts["disabled_optimizers"] or None,
            )
        except Exception as e:  # ORT raises its own exception types
            raise BuildError(f"ONNX Runtime could not load {src.name} ({e}); rebuild with --force") from e
        files = sorted(tmp.iterdir(), key=lambda p: p.name == dst.name)  # the graph last
        if not (tmp / dst.name).is_file():
            raise BuildError(f"ONNX Runtime wrote no optimized model for {src.name}")
        for f in files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(f, dst.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return opts

"""Compile stage for ONNX Runtime: the (Q/DQ) graph -> the graph after ORT's offline optimizations.

ONNX Runtime artifacts are the graph after ORT's offline optimizations (CPU execution provider),
saved with the options that load them (`runtime_options`, recorded in the manifest).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..files import move_into_place
from .quantize import ORT_FP8_DISABLED_OPTIMIZERS, Recipe

log = logging.getLogger(__name__)

ORT_LEVEL = "ORT_ENABLE_EXTENDED"  # hardware-independent fusions; ENABLE_ALL adds layout changes


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
        if not (tmp / dst.name).is_file():
            raise BuildError(f"ONNX Runtime wrote no optimized model for {src.name}")
        move_into_place(tmp, dst.parent, last=dst.name)  # external data first, the graph last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return opts

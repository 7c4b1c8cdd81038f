"""Quantize stage: recipes (fp32, bf16, fp8, int8) and ModelOpt's ONNX Q/DQ quantization.

Each recipe is one small frozen object; its dict goes into the manifest and into the stage hash.
Layers kept in high precision follow ModelOpt's Flux filter (embedders, norm_out) plus the final
proj_out: it writes the velocity itself, so its error lands un-normalized in every Euler step,
and it is ~0.002% of the FLOPs (hidden -> 64), so quantizing it buys nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.tensorrt_plans import tensorrt_module
from ..errors import BackendUnavailableError, BuildError, ConfigError
from ..files import move_into_place

log = logging.getLogger(__name__)

# ModelOpt's Flux filter (examples/diffusers: filter_func), as anchored regexes over our node
# names '/<module path>/<Op>' (export.name_nodes_by_module), plus the final '/proj_out/'.
HIGH_PRECISION_LAYERS: tuple[str, ...] = (
    r"^/(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out)/",
)
ORT_FP8_DISABLED_OPTIMIZERS = ("QDQSelectorActionTransformer", "MatMulIntegerToFloatFusion")


@dataclass(frozen=True)
class Recipe:
    """How one precision is made. `mode` None: the exported graph as is."""

    name: str
    mode: str | None  # ModelOpt quantize_mode: "int8" | "fp8" | None
    bound_rel_l2: float  # verification bound vs the fp32 torch transformer (relative L2)
    calibration_method: str = "max"  # ModelOpt: "max" | "entropy"
    exclude: tuple[str, ...] = HIGH_PRECISION_LAYERS
    attention: bool = False  # fp8: Q/DQ on the q/k/v bmm and softmax output (FP8 attention, Hopper)
    high_precision_dtype: str = "fp32"  # dtype of what stays unquantized ("fp16"/"bf16" for TensorRT)
    op_types: tuple[str, ...] | None = None  # ModelOpt op_types_to_quantize (None: its default set)
    split_shared_qdq: bool = False  # a Q/DQ pair per MatMul consumer (qdq.py): ONNX Runtime int kernels
    tensorrt_only: bool = False  # no ONNX Runtime artifact (bf16: no useful CPU kernels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @property
    def quantized(self) -> bool:
        return self.mode is not None


# Bounds: fp32 is the same math (export parity is ~1e-6; above 1e-4 the export is broken).
# int8 and fp8: about 3x what the tiny random model (no outlier weights) measures, below where an
# edit visibly drifts. The measured errors are in each build's manifest (`kontext info build/tiny`).
RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("fp32", None, bound_rel_l2=1e-4),
    "bf16": Recipe("bf16", None, bound_rel_l2=2e-2, high_precision_dtype="bf16", tensorrt_only=True),
    # MatMul/Gemm only: ModelOpt's default also puts Q/DQ on Add, Mul and LayerNorm inputs, which
    # tripled the error on `small` (2.75% -> 0.87% mean relative L2) and was no faster.
    "int8": Recipe(
        "int8", "int8", bound_rel_l2=0.08, calibration_method="entropy", op_types=("MatMul", "Gemm")
    ),
    "fp8": Recipe("fp8", "fp8", bound_rel_l2=0.15, calibration_method="max"),
}


def for_backend(recipe: Recipe, backend: str) -> Recipe:
    """The recipe as `backend` should build it.

    TensorRT builds a strongly typed network, so what stays unquantized runs in the graph's own
    dtype: a quantized recipe keeps bf16 there (ModelOpt converts it), not fp32. ONNX Runtime on a
    CPU has no useful bf16 kernels, so it keeps fp32, and it fuses Q/DQ into integer MatMuls only
    where each MatMul has its own activation pair (split_shared_qdq; TensorRT needs no such help).
    """
    from dataclasses import replace

    if not recipe.quantized:
        return recipe
    if backend == "tensorrt" and recipe.high_precision_dtype == "fp32":
        return replace(recipe, high_precision_dtype="bf16")
    if backend == "onnxruntime":
        return replace(recipe, split_shared_qdq=True)
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe `name`, or a ConfigError naming the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown precision {name!r}; choose from: {', '.join(RECIPES)}") from None


class SampleReader:
    """ONNX Runtime CalibrationDataReader over a list of per-call input dicts.

    A dict of stacked arrays would be split along axis 0 for every input, and img_ids / txt_ids
    have no batch axis, so each call is fed whole.
    """

    def __init__(self, samples: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> None:
        if not samples:
            raise BuildError("calibration produced no samples; check the calibration spec (edits, steps)")
        self.samples = [{n: s[n] for n in names} for s in samples]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.samples[0]

    def rewind(self) -> None:
        self._it = iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@contextmanager
def _modelopt_without_stub_tensorrt() -> Iterator[Any]:
    """Import ModelOpt's ONNX quantizer; hide a stub-only `tensorrt` (tensorrt-stubs) from it.

    tensorrt-stubs installs a `tensorrt/` folder of .pyi files, so `import tensorrt` succeeds as a
    namespace package and ModelOpt then calls trt.Logger, which it lacks. The flag is restored after.
    """
    try:
        import modelopt.onnx.quantization as moq
        import modelopt.onnx.trt_utils as trt_utils
    except ImportError as e:
        raise BackendUnavailableError(
            f"ModelOpt's ONNX quantizer is not installed ({e}); run "
            "`pip install -e '.[quant]'` (or `make install`)"
        ) from e
    saved = trt_utils.TRT_PYTHON_AVAILABLE
    trt_utils.TRT_PYTHON_AVAILABLE = saved and tensorrt_module() is not None
    try:
        yield moq
    finally:
        trt_utils.TRT_PYTHON_AVAILABLE = saved


def quantize_onnx(
    src: Path,
    dst: Path,
    recipe: Recipe,
    samples: Sequence[dict[str, np.ndarray]],
    input_names: Sequence[str],
    *,
    calibration_eps: Sequence[str] = ("cpu",),
) -> None:
    """Q/DQ-quantize the graph `src` into `dst` with `recipe`, calibrated on `samples`.

    ModelOpt runs on a private copy in a temporary folder (it rewrites its input graph and writes
    intermediate files beside it), and only the finished graph is renamed to `dst`.
    """
    if recipe.mode is None:
        raise BuildError(f"recipe {recipe.name} does not quantize; use the exported graph directly")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".quantize-"))
    try:
        for f in src.parent.glob(src.name + "*"):  # copies: ModelOpt rewrites its input graph in place
            shutil.copy2(f, tmp / f.name)
        out = tmp / "out" / dst.name  # apart from the input copies: everything under out/ is moved
        out.parent.mkdir()
        external = any(p.name != src.name for p in src.parent.glob(src.name + "*"))
        # ONNX Runtime's calibrators print progress on stdout: keep it for -vv, off the user's screen.
        with _modelopt_without_stub_tensorrt() as moq, contextlib.redirect_stdout(io.StringIO()) as chatter:
            moq.quantize(
                str(tmp / src.name),
                quantize_mode=recipe.mode,
                calibration_method=recipe.calibration_method,
                calibration_data_reader=SampleReader(samples, input_names),
                calibration_eps=list(calibration_eps),
                nodes_to_exclude=list(recipe.exclude),
                disable_mha_qdq=not recipe.attention,
                high_precision_dtype=recipe.high_precision_dtype,
                use_external_data_format=external,
                output_path=str(out),
                log_level="WARNING",
                **({"op_types_to_quantize": list(recipe.op_types)} if recipe.op_types else {}),
            )
        log.debug("quantizer output: %s", chatter.getvalue())
        if not out.is_file():
            raise BuildError(f"ModelOpt wrote no {out.name}; run with -vv to see its log")
        if recipe.split_shared_qdq:
            _split_qdq(out, external)
        move_into_place(out.parent, dst.parent, last=dst.name)  # external data first, the graph last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split_qdq(path: Path, external: bool) -> None:
    """Apply qdq.split_shared_activation_qdq to the graph at `path` (still in the private folder)."""
    import onnx

    from .qdq import split_shared_activation_qdq

    model = onnx.load(str(path))  # with its external data, if any
    added = split_shared_activation_qdq(model)
    log.info("%s: %d activation Q/DQ pairs split per MatMul consumer", path.name, added)
    for f in path.parent.glob(path.name + "?*"):  # external data is rewritten below
        f.unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


def qdq_counts(path: Path) -> dict[str, int]:
    """Q/DQ statistics of a graph: QuantizeLinear / DequantizeLinear nodes, quantized MatMul/Gemm
    (a DequantizeLinear feeding their weight input), and the MatMul/Gemm left in high precision."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    quantized, plain = matmul_weights(path)
    return {
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
        "quantized_matmuls": len(quantized),
        "high_precision_matmuls": len(plain),
    }


def matmul_weights(path: Path) -> tuple[list[str], list[str]]:
    """Names of the MatMul/Gemm nodes whose weight input is quantized (fed by a DequantizeLinear), and
    of those left in high precision."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized: list[str] = []
    plain: list[str] = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            src = producers.get(n.input[1])
            (quantized if src is not None and src.op_type == "DequantizeLinear" else plain).append(n.name)
    return quantized, plain

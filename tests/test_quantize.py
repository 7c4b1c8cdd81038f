"""Quantize: recipes, the calibration reader, Q/DQ node counts, excluded layers, errors within bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.backends import DENOISER_INPUTS
from engine.builder.builder import GOLDEN_REL, build
from engine.builder.calibrate import load_golden
from engine.builder.quantize import (
    RECIPES,
    SampleReader,
    for_backend,
    get_recipe,
    matmul_weights,
    qdq_counts,
    quantize_onnx,
)
from engine.builder.verify import artifact_denoiser, verify
from engine.errors import ConfigError
from engine.manifest import read_manifest

# tiny preset: 1 double + 2 single blocks -> 42 MatMul/Gemm: 6 attention bmm's (activation x
# activation, 2 per block), 10 kept in high precision by the filter (x_embedder, context_embedder,
# 6 time_text_embed linears, norm_out.linear, proj_out), and 4 AdaLN modulation Gemms (norm1,
# norm1_context, 2 single-block norms) that ModelOpt's ONNX quantizer leaves unquantized itself.
EXCLUDED = 10
ATTENTION_BMM = 6
ADALN_GEMMS = 4
WEIGHT_MATMULS = 42 - ATTENTION_BMM


def test_recipes_are_small_named_objects() -> None:
    assert set(RECIPES) == {"fp32", "bf16", "int8", "fp8"}
    assert RECIPES["fp32"].mode is None and RECIPES["fp32"].bound_rel_l2 == 1e-4
    d = RECIPES["int8"].to_dict()
    assert d["name"] == "int8" and isinstance(d["exclude"], list)
    with pytest.raises(ConfigError, match="fp32"):
        get_recipe("int4")


def test_reader_feeds_whole_calls() -> None:
    s = {n: np.zeros((2, 3), np.float32) for n in DENOISER_INPUTS}
    s["img_ids"] = np.zeros((7, 3), np.float32)  # no batch axis
    r = SampleReader([s, s], DENOISER_INPUTS)
    assert r.get_first()["img_ids"].shape == (7, 3)
    assert r.get_next() is not None and r.get_next() is not None and r.get_next() is None
    r.rewind()
    assert r.get_next() is not None


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_graphs(built_tiny: Path, precision: str) -> None:
    path = built_tiny / f"onnx/transformer_{precision}.onnx"
    counts = qdq_counts(path)
    assert counts["quantized_matmuls"] == WEIGHT_MATMULS - EXCLUDED - ADALN_GEMMS == 22
    assert counts["high_precision_matmuls"] == EXCLUDED + ATTENTION_BMM + ADALN_GEMMS
    assert counts["QuantizeLinear"] >= counts["quantized_matmuls"]
    assert counts["DequantizeLinear"] >= counts["QuantizeLinear"]
    kept = set(matmul_weights(path)[1])
    for layer in ("/x_embedder/", "/context_embedder/", "/time_text_embed/", "/norm_out/", "/proj_out/"):
        assert any(n.startswith(layer) for n in kept), layer
    assert not any(n.startswith("/single_transformer_blocks/0/proj_out/") for n in kept)
    manifest = read_manifest(built_tiny)
    assert manifest.artifact(precision).build_options["qdq"] == counts


def test_recorded_errors_are_the_artifacts_and_order_as_the_precisions(built_tiny: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """The build enforces only rel_l2 <= bound. Beyond that: the manifest's errors are what each artifact
    gives again on the golden trajectory (re-measured through the runtime's Denoiser), every served key
    has its two samples, and the errors tell the precisions apart: fp32 at float rounding, the
    quantized graphs orders of magnitude above it (really quantized), each under its own bound."""
    golden = load_golden(built_tiny / GOLDEN_REL)
    worst = {}
    for precision in ("fp32", "int8", "fp8"):
        a = read_manifest(built_tiny).artifact(precision)
        assert len(a.verification) == 4 and all(v.samples == 2 for v in a.verification.values())
        denoiser = artifact_denoiser(built_tiny, a, tiny.preset.transformer, device="cpu")
        try:
            again = verify(denoiser, golden, sorted(a.verification), 1.0, precision, progress=False)
        finally:
            denoiser.close()
        for key, v in a.verification.items():
            assert again[key].rel_l2 == pytest.approx(v.rel_l2, rel=1e-3), (precision, key)
            assert v.bound == RECIPES[precision].bound_rel_l2
        worst[precision] = max(v.rel_l2 for v in a.verification.values())
    assert 0 < worst["fp32"] < 1e-5
    assert worst["fp32"] * 100 < min(worst["int8"], worst["fp8"])


def test_bf16_is_refused_on_onnxruntime(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    from engine.errors import BuildError

    with pytest.raises(BuildError, match="bf16"):
        build("tiny", out_dir=tmp_path, precisions=("bf16",), backend="onnxruntime", components=tiny)


def _scales(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if "scale" in i.name.lower()}


@pytest.mark.slow  # two calibration captures and a quantization
def test_same_calibration_gives_the_same_scales(built_tiny: Path, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Seeded calibration: a second capture is identical, and quantizing it reproduces the build's scales."""
    from engine.builder.calibrate import capture_calibration
    from engine.calibration import CalibrationSpec

    from .conftest import BUILD_TEST_CALIBRATION

    spec = CalibrationSpec(**BUILD_TEST_CALIBRATION)  # type: ignore[arg-type]
    first, again = capture_calibration(tiny, spec, "tiny"), capture_calibration(tiny, spec, "tiny")
    assert len(first) == len(again) > 0
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    src = built_tiny / "onnx/transformer.onnx"
    recipe = for_backend(RECIPES["int8"], "onnxruntime")  # as the build made it
    quantize_onnx(src, tmp_path / "q.onnx", recipe, again, DENOISER_INPUTS)
    built, redone = _scales(built_tiny / "onnx/transformer_int8.onnx"), _scales(tmp_path / "q.onnx")
    assert len(built) >= 22 and built.keys() == redone.keys()
    assert all(np.array_equal(built[k], redone[k]) for k in built)


def test_recipes_as_each_backend_builds_them() -> None:
    """TensorRT (strongly typed) runs unquantized layers in the graph's dtype: bf16, not fp32.
    ONNX Runtime keeps fp32 and needs a Q/DQ pair per MatMul to use its integer kernels."""
    for name in ("int8", "fp8"):
        trt = for_backend(RECIPES[name], "tensorrt")
        assert trt.high_precision_dtype == "bf16" and not trt.split_shared_qdq
        ort = for_backend(RECIPES[name], "onnxruntime")
        assert ort.high_precision_dtype == "fp32" and ort.split_shared_qdq
    assert for_backend(RECIPES["fp32"], "tensorrt") == RECIPES["fp32"]


def test_onnxruntime_runs_every_quantized_matmul_on_integer_kernels(built_tiny: Path) -> None:
    """With a Q/DQ pair per MatMul (qdq.py), ORT fuses each quantized MatMul into MatMulIntegerToFloat;
    with ModelOpt's shared pairs it fused only some and dequantized int8 weights at every call."""
    from collections import Counter

    import onnx

    artifact = read_manifest(built_tiny).artifact("int8")
    quantized = artifact.build_options["qdq"]["quantized_matmuls"]
    ops = Counter(
        n.op_type for n in onnx.load(str(built_tiny / artifact.path), load_external_data=False).graph.node
    )
    assert ops["MatMulIntegerToFloat"] == quantized == 22
    assert ops["DequantizeLinear"] == 0  # no int8 weight is dequantized at run time

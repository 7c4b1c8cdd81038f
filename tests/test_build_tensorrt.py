"""TensorRT: everything that does not need TensorRT itself (profiles, names, checks, backend choice)."""

from __future__ import annotations

import pytest
import torch
from engine.build.compile import choose_backend

from engine.buckets import ShapeKey, family_shape_keys
from engine.build.tensorrt_build import (
    TensorRTOptions,
    check_capability,
    family_profiles,
    plan_name,
    profile_shapes,
    tensorrt_available,
)
from engine.errors import BackendUnavailableError, BuildError, ConfigError


def test_profile_shapes_are_static_per_key() -> None:
    shapes = profile_shapes(ShapeKey(1, 4096, 4096, 512), 64, 4096, 768)
    assert shapes["hidden_states"] == (1, 8192, 64)
    assert shapes["img_ids"] == (8192, 3)
    assert shapes["encoder_hidden_states"] == (1, 512, 4096)
    assert shapes["txt_ids"] == (512, 3)
    assert shapes["pooled_projections"] == (1, 768)
    assert shapes["timestep"] == shapes["guidance"] == (1,)


def test_one_profile_per_shape_key_of_the_family() -> None:
    keys = family_shape_keys("1mp", 512)
    profiles = family_profiles(keys)
    assert len(profiles) == 9  # 17 resolutions, 9 token counts
    assert sorted(profiles.values()) == list(range(9))
    assert profiles[str(min(keys))] == 0


def test_plan_name_carries_precision_family_version_gpu() -> None:
    name = plan_name("fp8", "1mp", "10.13.0.35", "NVIDIA H100 80GB HBM3")
    assert name == "transformer_fp8_1mp_trt10.13.0.35_nvidia-h100-80gb-hbm3.plan"
    assert plan_name("fp8", "0.5mp", "10.13", "A") != plan_name("int8", "0.5mp", "10.13", "A")


def test_fp8_needs_compute_capability_8_9() -> None:
    check_capability("fp8", (8, 9))
    check_capability("fp8", (9, 0))
    check_capability("int8", (8, 0))
    check_capability(None, (7, 0))
    with pytest.raises(BuildError, match=r"8\.9.*int8"):
        check_capability("fp8", (8, 0), "NVIDIA A100")


def test_options_are_checked() -> None:
    assert TensorRTOptions().extra_memory_target == 0.0
    with pytest.raises(BuildError):
        TensorRTOptions(opt_level=7)
    with pytest.raises(BuildError):
        TensorRTOptions(workspace_gb=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_backend_choice_without_gpu() -> None:
    backend, why = choose_backend("auto")
    assert backend == "onnxruntime" and "no CUDA device" in why
    with pytest.raises(BackendUnavailableError, match="onnxruntime"):
        choose_backend("tensorrt")
    with pytest.raises(ConfigError):
        choose_backend("tvm")


def test_stub_only_tensorrt_is_not_tensorrt() -> None:
    try:
        import tensorrt
    except ImportError:
        assert not tensorrt_available()
        return
    assert tensorrt_available() == hasattr(tensorrt, "Builder")


@pytest.mark.trt
@pytest.mark.skipif(
    not (tensorrt_available() and torch.cuda.is_available()), reason="needs TensorRT and a CUDA device"
)
def test_tensorrt_build_end_to_end(tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    from engine.build.builder import BuildOptions, build
    from engine.build.calibrate import CalibrationSpec

    m = build(
        "tiny",
        tmp_path,
        ("fp32", "int8"),
        "tiny",
        "tensorrt",
        False,
        BuildOptions(calibration=CalibrationSpec(edits=4, steps=2), progress=False),
        components=tiny,
    )
    assert m.backend == "tensorrt" and m.gpu
    for a in m.artifacts:
        assert a.path.endswith(".plan") and sorted(a.profiles.values()) == list(range(4))

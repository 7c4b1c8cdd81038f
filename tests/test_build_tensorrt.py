"""TensorRT build: what does not need TensorRT itself (options, capability checks, backend choice), and
the end-to-end build on a GPU machine with TensorRT (trt-marked). Plan writing, TF32, the timing cache
and the profiles are tested against fakes in test_tensorrt_logic.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends.tensorrt_plans import tensorrt_module
from engine.builder.backend import choose_backend
from engine.builder.tensorrt_build import TensorRTOptions, allows_tf32, check_capability
from engine.errors import BackendUnavailableError, BuildError, ConfigError
from engine.model.components import Components


def test_fp8_needs_compute_capability_8_9() -> None:
    check_capability("fp8", (8, 9))
    check_capability("fp8", (9, 0))
    check_capability("int8", (8, 0))
    check_capability(None, (7, 0))
    with pytest.raises(BuildError, match=r"8\.9.*int8"):
        check_capability("fp8", (8, 0), "NVIDIA A100")


def test_options_are_checked() -> None:
    assert TensorRTOptions().profiles == "dynamic" and TensorRTOptions().extra_memory_target == 0.0
    for bad in ({"opt_level": 7}, {"workspace_gb": 0}, {"profiles": "both"}, {"extra_memory_target": 2.0}):
        with pytest.raises(BuildError):
            TensorRTOptions(**bad)  # type: ignore[arg-type]


def test_only_the_fp32_recipe_runs_without_tf32() -> None:
    assert not allows_tf32(None, "fp32")
    assert allows_tf32("int8", "fp16") and allows_tf32("fp8", "fp16") and allows_tf32("int8", "fp32")


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
        assert tensorrt_module() is None
        return
    assert (tensorrt_module() is not None) == hasattr(tensorrt, "Builder")


@pytest.mark.trt
@pytest.mark.parametrize("profiles", ["dynamic", "static"])
@pytest.mark.skipif(
    not (tensorrt_module() is not None and torch.cuda.is_available()),
    reason="needs TensorRT and a CUDA device",
)
def test_tensorrt_build_end_to_end(tmp_path: Path, tiny: Components, profiles: str) -> None:
    """fp32 (TF32 cleared, bound 1e-4) and int8, verified through TrtDenoiser with CUDA graphs (T2)."""
    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec

    options = BuildOptions(
        calibration=CalibrationSpec(edits=4, steps=2),
        tensorrt=TensorRTOptions(profiles=profiles),
        progress=False,
    )
    m = build(
        "tiny",
        out_dir=tmp_path,
        precisions=("fp32", "int8"),
        family="tiny",
        backend="tensorrt",
        options=options,
        components=tiny,
    )
    assert m.backend == "tensorrt" and m.gpu
    n_profiles = 4 if profiles == "static" else 1
    for a in m.artifacts:
        assert a.path.endswith(".plan") and a.profile_mode == profiles
        assert sorted(set(a.profiles.values())) == list(range(n_profiles))
        assert all(v.rel_l2 <= v.bound for v in a.verification.values())

"""The TensorRT runtime's logic, tested without TensorRT: routes, shapes, plan names, the LRU plan
budget, and the refusals. The code that needs TensorRT is type-checked (mypy, typings/tensorrt) and
exercised by the trt-marked test on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from engine.backends.tensorrt_plans import (
    PlanBudget,
    Route,
    device_memory_block,
    input_shapes,
    parse_plan_name,
    profile_table,
    route_for,
)
from engine.buckets import ShapeKey, family_shape_keys
from engine.build.manifest import Artifact
from engine.errors import BackendUnavailableError, ConfigError, ManifestError, ShapeNotServedError

GiB = 2**30


def _artifact(path: str, family: str, precision: str = "fp8", keys=None) -> Artifact:
    keys = sorted(keys or family_shape_keys(family, 512))
    return Artifact(
        path=path,
        sha256="0" * 64,
        bytes=12 * GiB,
        backend="tensorrt",
        precision=precision,
        family=family,
        profiles={str(k): i for i, k in enumerate(keys)},
    )


def test_every_key_routes_to_its_profile_across_families():
    one, half = _artifact("a_1mp.plan", "1mp"), _artifact("a_05mp.plan", "0.5mp")
    table = profile_table((one, half))
    keys = one.shape_keys() | half.shape_keys()
    assert len(table) == len(keys) == 18  # 9 token counts per family, no shared signature
    for key in keys:
        route = route_for(table, (key.batch, key.image_tokens, key.text_tokens), frozenset(keys))
        art = one if key in one.shape_keys() else half
        assert route == Route(art.path, art.profiles[str(key)])
    with pytest.raises(ShapeNotServedError, match="b1_t4096_c4096_x512"):
        route_for(table, (1, 2 * 4000, 512), frozenset(keys))
    bad = Artifact(**{**one.__dict__, "profiles": {str(k): 99 for k in one.shape_keys()}})
    with pytest.raises(ManifestError, match="profile indices"):
        profile_table((bad,))


def test_input_shapes_and_memory_block():
    s = input_shapes(ShapeKey(2, 4096, 4096, 512), channels=64, text_dim=4096, pooled_dim=768)
    assert s["hidden_states"] == (2, 8192, 64) and s["img_ids"] == (8192, 3)
    assert s["encoder_hidden_states"] == (2, 512, 4096) and s["txt_ids"] == (512, 3)
    assert s["pooled_projections"] == (2, 768) and s["timestep"] == s["guidance"] == (2,)
    assert device_memory_block({0: 1000, 1: 5000, 2: 300}) == 5120  # the largest, 256-aligned
    assert device_memory_block({}) == 0


def test_plan_names_follow_the_build_step():
    from engine.build.tensorrt_build import plan_name

    name = plan_name("fp8", "0.5mp", "10.13.0.35", "NVIDIA H100 80GB HBM3")
    p = parse_plan_name(f"tensorrt/{name}")
    assert p is not None and (p.precision, p.family) == ("fp8", "0.5mp")
    assert p.mismatch("10.13.0.35", "NVIDIA H100 80GB HBM3") is None
    assert "TensorRT" in (p.mismatch("10.8.0", "NVIDIA H100 80GB HBM3") or "")
    assert "GPU" in (p.mismatch("10.13.0.35", "NVIDIA H200") or "")
    assert parse_plan_name("model.plan") is None


def test_plan_budget_evicts_least_recently_used_unpinned():
    b = PlanBudget(30 * GiB)
    assert b.admit("1mp", 12 * GiB) == [] and b.admit("0.5mp", 10 * GiB) == []
    b.touch("1mp")  # 0.5mp is now the least recently used
    assert b.admit("0.25mp", 8 * GiB) == []  # 30 GiB: fits exactly
    assert b.admit("small", 5 * GiB) == ["0.5mp"]
    b.pin("1mp")
    assert b.admit("0.5mp", 10 * GiB) == ["0.25mp"]  # the oldest unpinned; 1mp is in use
    assert b.loaded() == ("1mp", "small", "0.5mp") and b.used == 27 * GiB
    with pytest.raises(ConfigError, match="does not fit"):
        b.pin("0.5mp") or b.admit("other", 10 * GiB)
    assert b.loaded() == ("1mp", "small", "0.5mp")  # a refused admission evicts nothing
    b.unpin("0.5mp")
    assert b.admit("other", 10 * GiB) == ["small", "0.5mp"]
    with pytest.raises(ConfigError, match="more than the plan memory budget"):
        b.admit("huge", 31 * GiB)
    with pytest.raises(ConfigError):
        PlanBudget(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_checked_before_tensorrt():
    from engine.backends.tensorrt import require_tensorrt

    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        require_tensorrt()


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engine_on_gpu(tmp_path):
    """On a GPU machine with TensorRT: build a tiny plan, run it, match torch (the lead's GPU run)."""
    pytest.importorskip("tensorrt")
    from engine.backends.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    from engine.build.builder import build
    from engine.runtime import load

    from .conftest import gradient_image

    build("tiny", tmp_path, ("bf16",), None, "tensorrt", False)
    with load(tmp_path, workers=2) as trt_engine, load("tiny", device="cuda") as eager:
        trt_engine.warmup()
        image = gradient_image(128, 128)
        a = trt_engine.edit(image, "a hat", seed=0, steps=4).latents.float()
        b = eager.edit(image, "a hat", seed=0, steps=4).latents.float()
        assert float((a - b).norm() / b.norm()) < 0.05

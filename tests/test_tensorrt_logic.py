"""TensorRT without TensorRT: the build's and the runtime's logic against small fakes of TensorRT 10's
objects (tests/trt_fakes.py), one test per finding of docs/tensorrt-audit.md that a CPU can show, and the pure
functions (routes, profiles, names, the plan budget). The trt-marked test at the end runs the real
thing on a GPU machine with TensorRT."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from pathlib import Path

import pytest
import torch

from engine.backends import key_signature
from engine.backends.inputs import dummy_inputs, input_shapes
from engine.backends.tensorrt_plans import (
    PlanBudget,
    Route,
    device_memory_block,
    family_profiles,
    opt_key,
    parse_plan_name,
    plan_name,
    profile_shapes,
    profile_table,
    route_for,
)
from engine.buckets import ShapeKey, family_shape_keys
from engine.config import PRESETS
from engine.errors import BackendUnavailableError, ConfigError, ManifestError, ShapeNotServedError
from engine.manifest import Artifact

from . import trt_fakes

GiB = 2**30
CFG = PRESETS["tiny"].transformer
REBUILD = "kontext build --model tiny --build build/tiny --force"


def _artifact(
    path: str, family: str, mode: str = "static", nbytes: int = 12 * GiB, text: int = 512
) -> Artifact:
    return Artifact(
        path=path,
        sha256="0" * 64,
        bytes=nbytes,
        backend="tensorrt",
        precision="fp8",
        family=family,
        profiles=family_profiles(family_shape_keys(family, text), mode),
        profile_mode=mode,
        runtime_options={},
        source_sha256="1" * 64,
        build_options={},
    )


# ----------------------------------------------------------------------------- pure logic


def test_every_key_routes_to_its_profile_across_families() -> None:
    one, half = _artifact("a_1mp.plan", "1mp"), _artifact("a_05mp.plan", "0.5mp")
    table = profile_table((one, half))
    keys = one.shape_keys() | half.shape_keys()
    assert len(table) == len(keys) == 18  # 9 token counts per family, no shared signature
    for key in keys:
        art = one if key in one.shape_keys() else half
        assert route_for(table, key_signature(key), frozenset(keys)) == Route(
            art.path, art.profiles[str(key)]
        )
    with pytest.raises(ShapeNotServedError, match="b1_t4096_c4096_x512"):
        route_for(table, (1, 2 * 4000, 512), frozenset(keys))
    bad = Artifact(**{**one.__dict__, "profiles": {str(k): 99 for k in one.shape_keys()}})
    with pytest.raises(ManifestError, match="profile indices"):
        profile_table((bad,))


def test_static_and_dynamic_profiles_of_a_family() -> None:
    keys = sorted(family_shape_keys("1mp", 512))
    static, dynamic = family_profiles(keys, "static"), family_profiles(keys, "dynamic")
    assert sorted(static.values()) == list(range(9)) and set(dynamic.values()) == {0}
    with pytest.raises(ConfigError):
        family_profiles(keys, "sometimes")
    cfg = PRESETS["kontext-dev"].transformer
    for key in keys:  # static: min = opt = max = the key's shapes
        shapes = profile_shapes(cfg, [key], "1mp")
        assert all(lo == opt == hi == input_shapes(cfg, key)[n] for n, (lo, opt, hi) in shapes.items())
    assert opt_key(keys, "1mp") == ShapeKey(1, 4096, 4096, 512)  # the 1024x1024 edit
    lo, opt, hi = profile_shapes(cfg, keys, "1mp")["hidden_states"]
    image = [k.image_tokens for k in keys]
    assert (lo, opt, hi) == ((1, min(image), 64), (1, 8192, 64), (1, max(image), 64))
    assert opt_key(sorted(family_shape_keys("tiny", 32)), "tiny") == ShapeKey(1, 64, 64, 32)  # 128x128


def test_input_shapes_and_dummy_inputs_agree() -> None:
    key = ShapeKey(2, 4096, 4096, 512)
    cfg = PRESETS["kontext-dev"].transformer
    s = input_shapes(cfg, key)
    assert s["hidden_states"] == (2, 8192, 64) and s["img_ids"] == (8192, 3)
    assert s["encoder_hidden_states"] == (2, 512, 4096) and s["txt_ids"] == (512, 3)
    assert s["pooled_projections"] == (2, 768) and s["timestep"] == s["guidance"] == (2,)
    small = ShapeKey(2, 64, 64, 32)
    x = dummy_inputs(CFG, small, dtype=torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in x.items()} == input_shapes(CFG, small)
    assert x["hidden_states"].dtype == torch.bfloat16 and x["guidance"].dtype == torch.float32
    assert device_memory_block({0: 1000, 1: 5000, 2: 300}) == 5120  # the largest, 256-aligned


def test_plan_names_round_trip() -> None:
    name = plan_name("fp8", "0.5mp", "10.13.0.35", "NVIDIA H100 80GB HBM3")
    assert name == "transformer_fp8_0.5mp_trt10.13.0.35_nvidia-h100-80gb-hbm3.plan"
    p = parse_plan_name(f"tensorrt/{name}")
    assert p is not None and (p.precision, p.family) == ("fp8", "0.5mp")
    assert p.mismatch("10.13.0.35", "NVIDIA H100 80GB HBM3") is None
    assert "TensorRT" in (p.mismatch("10.8.0", "NVIDIA H100 80GB HBM3") or "")
    assert "GPU" in (p.mismatch("10.13.0.35", "NVIDIA H200") or "")
    assert parse_plan_name("model.plan") is None


def test_plan_budget_evicts_least_recently_used_unpinned() -> None:
    b = PlanBudget(30 * GiB)
    assert b.admit("1mp", 12 * GiB) == [] and b.admit("0.5mp", 10 * GiB) == []
    b.touch("1mp")  # 0.5mp is now the least recently used
    assert b.admit("0.25mp", 8 * GiB) == []  # 30 GiB: fits exactly
    assert b.admit("small", 5 * GiB) == ["0.5mp"]
    b.pin("1mp")
    assert b.admit("0.5mp", 10 * GiB) == ["0.25mp"]  # the oldest unpinned; 1mp is in use
    assert b.loaded() == ("1mp", "small", "0.5mp") and b.used == 27 * GiB
    b.pin("0.5mp")
    with pytest.raises(ConfigError, match="does not fit"):
        b.admit("other", 10 * GiB)
    assert b.loaded() == ("1mp", "small", "0.5mp")  # a refused admission evicts nothing
    b.unpin("0.5mp")
    assert not b.pinned("0.5mp") and b.pinned("1mp")
    assert b.admit("other", 10 * GiB) == ["small", "0.5mp"]
    with pytest.raises(ConfigError, match="more than the plan memory budget"):
        b.admit("huge", 31 * GiB)
    with pytest.raises(ConfigError):
        PlanBudget(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_checked_before_tensorrt() -> None:
    from engine.backends.tensorrt_plans import require_tensorrt

    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        require_tensorrt()


# ----------------------------------------------------------------------------- the build, with fakes


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> trt_fakes.FakeState:
    return trt_fakes.install_fake_tensorrt(monkeypatch)


def _build_plan(
    tmp: Path,
    family: str,
    mode: str,
    *,
    recipe_mode: str | None = "fp8",
    hp: str = "fp16",
    cache: Path | None = None,
) -> Path:
    from engine.builder.tensorrt_build import TensorRTOptions, allows_tf32, build_plan

    onnx = tmp / "t.onnx"
    onnx.write_bytes(b"graph")
    plan = tmp / f"{family}-{mode}.plan"
    keys = sorted(family_shape_keys(family, 32))
    build_plan(
        onnx,
        plan,
        cfg=CFG,
        keys=keys,
        family=family,
        mode=recipe_mode,
        tf32=allows_tf32(recipe_mode, hp),
        options=TensorRTOptions(profiles=mode),
        timing_cache=cache or tmp / "timing.cache",
    )
    return plan


def test_plan_written_from_the_buffer_without_a_copy(fake: trt_fakes.FakeState, tmp_path: Path) -> None:
    """B10: the plan goes to disk from TensorRT's IHostMemory (a buffer); bytes() of it would raise."""
    import json

    plan = _build_plan(tmp_path, "tiny", "dynamic")
    assert json.loads(plan.read_bytes()) == fake.plans_built[-1]
    assert (tmp_path / "timing.cache").read_bytes() == b"cache:" + trt_fakes.VERSION.encode()


def test_fp32_plans_clear_tf32(fake: trt_fakes.FakeState, tmp_path: Path) -> None:
    """B4/T2: TensorRT allows TF32 by default; the fp32 recipe (bound 1e-4) clears it."""
    _build_plan(tmp_path, "tiny", "dynamic", recipe_mode=None, hp="fp32")
    assert fake.plans_built[-1]["tf32"] is False
    _build_plan(tmp_path, "tiny", "dynamic", recipe_mode="int8", hp="fp16")
    assert fake.plans_built[-1]["tf32"] is True


@pytest.mark.parametrize("content", [b"from-another-gpu", b"garbage that does not parse"])
def test_refused_timing_cache_is_discarded_before_building(
    fake: trt_fakes.FakeState, tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """B7: a cache TensorRT refuses (another GPU or version) or cannot read is deleted, a fresh one used,
    and the plan builds; the cache written after it is this machine's."""
    cache = tmp_path / "timing.cache"
    cache.write_bytes(content)
    fake.foreign_caches.add(content)
    with caplog.at_level(logging.WARNING):
        _build_plan(tmp_path, "tiny", "dynamic", cache=cache)
    assert "timing cache" in caplog.text
    assert cache.read_bytes() == b"cache:" + trt_fakes.VERSION.encode()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_plan_profiles_are_the_manifests(fake: trt_fakes.FakeState, tmp_path: Path, mode: str) -> None:
    _build_plan(tmp_path, "tiny", mode)
    keys = sorted(family_shape_keys("tiny", 32))
    profiles = fake.plans_built[-1]["profiles"]
    assert len(profiles) == (len(keys) if mode == "static" else 1)
    for key, index in family_profiles(keys, mode).items():
        lo, opt, hi = (tuple(d) for d in profiles[index]["hidden_states"])
        want = input_shapes(CFG, next(k for k in keys if str(k) == key))["hidden_states"]
        assert lo <= want <= hi and (mode == "dynamic" or lo == opt == hi == want)


# ----------------------------------------------------------------------------- the runtime, with fakes


def _denoiser(
    tmp: Path, families: dict[str, str], *, workers: int = 1, budget: int | None = None, nbytes: int = 10
):  # type: ignore[no-untyped-def]
    """A TrtDenoiser over fake plans built by build_plan, one per family (family -> profile mode)."""
    from engine.backends.tensorrt import TrtDenoiser

    plans = []
    for family, mode in families.items():
        path = _build_plan(tmp, family, mode)
        plans.append((_artifact(path.name, family, mode, nbytes=nbytes, text=32), path))
    return TrtDenoiser(
        plans, transformer=CFG, device="cpu", workers=workers, plan_memory_budget=budget, rebuild=REBUILD
    )


def _call(d, key: ShapeKey, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = dummy_inputs(CFG, key, seed=seed)
    return d(**x), 2 * x["hidden_states"] + x["timestep"][:, None, None]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_every_key_runs_on_its_own_context(fake: trt_fakes.FakeState, tmp_path: Path, mode: str) -> None:
    d = _denoiser(tmp_path, {"tiny": mode}, workers=2)
    for i, key in enumerate(sorted(family_shape_keys("tiny", 32)) * 2):
        out, want = _call(d, key, seed=i)
        assert torch.equal(out, want), key
    assert fake.replays == 0  # no graph is captured while serving (R11, R13)
    with pytest.raises(ShapeNotServedError):
        _call(d, ShapeKey(1, 100, 100, 32))
    d.close()


def test_warmup_captures_every_key_on_every_worker_thread_local(
    fake: trt_fakes.FakeState, tmp_path: Path
) -> None:
    """R11-R13: captures happen in capture_graphs (warmup), on every worker, in thread_local mode; the
    graphs then serve, and recompute from the new inputs."""
    d = _denoiser(tmp_path, {"tiny": "dynamic"}, workers=2)
    keys = sorted(family_shape_keys("tiny", 32))
    for key in keys:
        d.capture_graphs(key)
    assert fake.capture_modes == ["thread_local"] * (2 * len(keys))
    eager = fake.eager_runs
    for i, key in enumerate(keys * 2):
        out, want = _call(d, key, seed=10 + i)
        assert torch.equal(out, want)
    assert fake.eager_runs == eager and fake.replays == 2 * len(keys)  # every call replayed a graph


def test_failed_capture_falls_back_to_eager(
    fake: trt_fakes.FakeState, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """R12: an enqueue refused inside the capture is noticed: logged, and the key runs eagerly."""
    d = _denoiser(tmp_path, {"tiny": "static"})
    fake.capture_ok = False
    key = ShapeKey(1, 64, 64, 32)
    with caplog.at_level(logging.WARNING):
        d.capture_graphs(key)
    assert "runs eagerly" in caplog.text
    out, want = _call(d, key, seed=3)
    assert torch.equal(out, want) and fake.replays == 0


def test_plan_profiles_must_match_the_manifest(fake: trt_fakes.FakeState, tmp_path: Path) -> None:
    """P4/R8: a plan whose profiles are not the manifest's keys is refused at load with the rebuild
    command, and a refused set_input_shape is an error, not a negative-dimension crash."""
    from engine.backends.tensorrt import TrtDenoiser

    path = _build_plan(tmp_path, "tiny", "static")  # text tokens 32
    wrong = _artifact(path.name, "tiny", "static", text=16)  # the manifest says 16
    d = TrtDenoiser([(wrong, path)], transformer=CFG, device="cpu", rebuild=REBUILD)
    with pytest.raises(ManifestError, match=r"profile 0: input .*kontext build --model tiny"):
        d(**dummy_inputs(CFG, sorted(family_shape_keys("tiny", 16))[0]))
    assert d._budget.loaded() == ()  # a failed load leaves nothing admitted or pinned (R15)
    right = _denoiser(tmp_path, {"tiny": "static"})
    fake.refuse_shapes = True
    with pytest.raises(ManifestError, match="refuses hidden_states"):
        _call(right, ShapeKey(1, 64, 64, 32))


def test_device_guard_around_every_tensorrt_call(fake: trt_fakes.FakeState, tmp_path: Path) -> None:
    """R16: the fakes raise on any TensorRT call outside torch.cuda.device(...): every test above ran
    under the guard. This one shows the check itself bites."""
    d = _denoiser(tmp_path, {"tiny": "static"})
    _call(d, ShapeKey(1, 64, 64, 32))
    engine = next(iter(d._plans.values())).engine
    with pytest.raises(AssertionError, match=r"outside torch\.cuda\.device"):
        engine.create_execution_context(trt_fakes.ExecutionContextAllocationStrategy.USER_MANAGED)


def test_deserialize_does_not_block_calls_of_loaded_plans(fake: trt_fakes.FakeState, tmp_path: Path) -> None:
    """R15: a plan being deserialized holds only its own loading lock."""
    d = _denoiser(tmp_path, {"tiny": "static", "small": "static"}, workers=2)
    tiny_key, small_key = ShapeKey(1, 64, 64, 32), sorted(family_shape_keys("small", 32))[0]
    _call(d, tiny_key)  # tiny's plan is loaded
    small_plan = fake.plans_built[1]["name"]
    fake.gates["deserialize:" + small_plan] = release = threading.Event()
    fake.deserializing[small_plan] = started = threading.Event()
    loader = threading.Thread(target=_call, args=(d, small_key))
    loader.start()
    assert started.wait(10)
    out, want = _call(d, tiny_key, seed=5)  # would deadlock if the deserialize held the call lock
    assert torch.equal(out, want)
    release.set()
    loader.join(10)
    assert not loader.is_alive()


def test_evicted_plan_is_released_when_its_busy_worker_returns(
    fake: trt_fakes.FakeState, tmp_path: Path
) -> None:
    """R14: a worker busy while its plan is evicted drops that plan's contexts (which keep the engine and
    its weights alive) when it comes back."""
    d = _denoiser(
        tmp_path, {"tiny": "static", "small": "static", "0.25mp": "static"}, workers=2, budget=20, nbytes=10
    )
    tiny, small, quarter = (sorted(family_shape_keys(f, 32))[0] for f in ("tiny", "small", "0.25mp"))
    _call(d, tiny)
    _call(d, tiny)  # both workers now hold contexts of the tiny plan
    tiny_engine = weakref.ref(d._plans[next(p for p in d._paths if p.startswith("tiny"))].engine)
    fake.gates[fake.plans_built[1]["name"]] = release = threading.Event()
    busy = threading.Thread(target=_call, args=(d, small))  # a worker holding tiny contexts, busy on small
    busy.start()
    while fake.plans_built[1]["name"] not in {p.engine.name for p in d._plans.values()}:
        threading.Event().wait(0.01)
    _call(d, quarter)  # the budget (2 plans) evicts tiny, the least recently used unpinned plan
    gc.collect()
    assert tiny_engine() is not None  # still referenced by the busy worker's contexts
    release.set()
    busy.join(10)
    gc.collect()
    assert tiny_engine() is None  # released when the busy worker came back


# ----------------------------------------------------------------------------- the real thing


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engine_on_gpu(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """On a GPU with TensorRT: build the tiny plan (fp8 on Ada/Hopper, else int8), warm up two workers
    (CUDA graphs), and match torch (T1: bf16 cannot be built, so the old test could never pass)."""
    from engine.backends.fp8 import FP8_MIN_CAPABILITY
    from engine.backends.tensorrt_plans import cuda_device, require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec
    from engine.runtime import load

    from .conftest import gradient_image

    device = cuda_device()
    precision = "fp8" if device is not None and device[1] >= FP8_MIN_CAPABILITY else "int8"
    options = BuildOptions(calibration=CalibrationSpec(edits=4, steps=2), progress=False)
    build(
        "tiny",
        out_dir=tmp_path,
        precisions=(precision,),
        backend="tensorrt",
        options=options,
        components=tiny,
    )
    with load(tmp_path, workers=2) as trt_engine, load("tiny", device="cuda") as eager:
        trt_engine.warmup()
        image = gradient_image(128, 128)
        a = trt_engine.edit(image, "a hat", seed=0, steps=4).latents.float()
        b = eager.edit(image, "a hat", seed=0, steps=4).latents.float()
        assert float((a - b).norm() / b.norm()) < 0.05


def test_tensorrt_build_on_fakes_end_to_end(
    fake: trt_fakes.FakeState, tiny_build: Path, tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The build's TensorRT branch, whole: compile through build_plan, then verification through
    TrtDenoiser (contexts, graphs captured and replayed), on a fake engine that runs the plan's ONNX
    graph. The export, calibration and reference stages are reused from the ONNX Runtime build."""
    import functools
    import shutil

    from engine.builder import verify
    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec
    from engine.manifest import read_manifest

    out = tmp_path / "tiny"
    shutil.copytree(tiny_build, out)
    fake.run_onnx = True
    monkeypatch.setattr(
        verify, "artifact_denoiser", functools.partial(verify.artifact_denoiser, device="cpu")
    )
    options = BuildOptions(calibration=CalibrationSpec(edits=4, steps=2), progress=False)
    m = build("tiny", out_dir=out, precisions=("fp32",), backend="tensorrt", options=options, components=tiny)
    (a,) = m.artifacts
    machine = ("tensorrt", trt_fakes.VERSION, trt_fakes.GPU, "9.0")
    assert (m.backend, m.backend_version, m.gpu, m.compute_capability) == machine
    assert a.path == f"tensorrt/{plan_name('fp32', 'tiny', trt_fakes.VERSION, trt_fakes.GPU)}"
    assert (
        a.profile_mode == "dynamic" and set(a.profiles.values()) == {0} and a.build_options["tf32"] is False
    )
    assert set(a.verification) == {str(k) for k in family_shape_keys("tiny", 32)}
    assert all(v.rel_l2 <= v.bound == 1e-4 for v in a.verification.values())
    assert fake.replays > 0  # the verified outputs came from CUDA-graph replays
    assert m.stages["export"] == read_manifest(tiny_build).stages["export"]  # reused, not rerun

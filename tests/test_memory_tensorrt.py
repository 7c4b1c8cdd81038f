"""TensorRT weight streaming under a memory plan, against the fakes (tests/trt_fakes.py): the builder
flag, the budget set on each deserialized engine before any context, the scratch counted in its device
memory, a plan built without streaming refused in one line, and the budget a plan gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends.tensorrt_streaming import plan_weight_budget
from engine.buckets import family_shape_keys
from engine.errors import ManifestError
from engine.memory.plan import plan_memory
from engine.memory.sizes import model_sizes

from . import trt_fakes
from .test_tensorrt_logic import CFG, REBUILD, _artifact, _call


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> trt_fakes.FakeState:
    return trt_fakes.install_fake_tensorrt(monkeypatch)


def build(tmp: Path, streaming: bool) -> Path:
    from engine.builder.tensorrt_build import TensorRTOptions, build_plan

    onnx = tmp / "t.onnx"
    onnx.write_bytes(b"graph")
    plan = tmp / f"tiny-{streaming}.plan"
    build_plan(
        onnx,
        plan,
        cfg=CFG,
        keys=sorted(family_shape_keys("tiny", 32)),
        family="tiny",
        mode="fp8",
        tf32=True,
        options=TensorRTOptions(weight_streaming=streaming),
        timing_cache=tmp / "timing.cache",
    )
    return plan


def denoiser(path: Path, budget: int | None):  # type: ignore[no-untyped-def]
    from engine.backends.tensorrt import TrtDenoiser

    art = _artifact(path.name, "tiny", "dynamic", nbytes=10, text=32)
    return TrtDenoiser([(art, path)], transformer=CFG, device="cpu", rebuild=REBUILD, weight_budget=budget)


def test_streamed_plan_gets_its_budget_before_any_context(fake: trt_fakes.FakeState, tmp_path: Path) -> None:
    path = build(tmp_path, streaming=True)
    assert fake.plans_built[-1]["streamable"] == 12_000
    d = denoiser(path, 4_000)
    key = sorted(family_shape_keys("tiny", 32))[0]
    out, want = _call(d, key)
    assert torch.equal(out, want)
    plan = next(iter(d._plans.values()))
    assert plan.engine.weight_streaming_budget_v2 == 4_000 and plan.engine.contexts >= 1
    assert plan.memory[0] == 1_000 + 500  # the profile's memory plus the streaming scratch
    d.close()
    d = denoiser(path, 10**12)  # more than the streamable weights: all of them, no scratch
    _call(d, key)
    plan = next(iter(d._plans.values()))
    assert plan.engine.weight_streaming_budget_v2 == 12_000 and plan.memory[0] == 1_000
    d.close()


def test_a_plan_built_without_streaming_is_refused_in_one_line(
    fake: trt_fakes.FakeState, tmp_path: Path
) -> None:
    d = denoiser(build(tmp_path, streaming=False), 4_000)
    with pytest.raises(ManifestError, match="built without weight streaming") as e:
        _call(d, sorted(family_shape_keys("tiny", 32))[0])
    assert "\n" not in str(e.value) and REBUILD in str(e.value)
    d.close()
    d = denoiser(build(tmp_path, streaming=False), None)  # no plan: no budget, runs as before
    _call(d, sorted(family_shape_keys("tiny", 32))[0])
    d.close()


def test_the_budget_of_a_plan() -> None:
    sizes = model_sizes("full")
    assert plan_weight_budget(plan_memory(sizes, vram=24, precision="fp8")) is None  # resident
    plan = plan_memory(sizes, vram=12, precision="fp8")
    budget = plan_weight_budget(plan)
    assert budget is not None and plan.levers.streamed
    # the heaviest phase with `budget` bytes of weights fills the card's budget exactly
    heaviest = max(p - plan.transformer_card_bytes for p in plan.phases.values())
    assert heaviest + budget == plan.budget_bytes
    assert 0 < budget < sizes.transformer_fp8  # some weights stream, some stay


def test_the_build_flag_reaches_the_builder_and_every_rebuild_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`kontext build --weight-streaming` builds with TensorRTOptions(weight_streaming=True), and the
    rebuild command of a build whose plans stream repeats the flag (and --profiles static), so a
    refusal's advice rebuilds the same kind of plans; the default build's command has neither."""
    import dataclasses

    from engine.builder import builder
    from engine.cli import main
    from engine.manifest import Manifest, rebuild_command

    seen = []

    def fake_build(model: str, **kw: object) -> Manifest:
        seen.append(kw["options"])
        raise ManifestError("stop here")  # a KontextError: main() answers 2 after the options are made

    monkeypatch.setattr(builder, "build", fake_build)
    assert main(["build", "--model", "tiny", "--weight-streaming", "--build", str(tmp_path)]) == 2
    assert main(["build", "--model", "tiny", "--build", str(tmp_path)]) == 2
    assert [o.tensorrt.weight_streaming for o in seen] == [True, False]  # type: ignore[attr-defined]

    streaming = dataclasses.replace(
        _artifact("p.plan", "tiny", "static", text=32),
        build_options={"tensorrt": {"profiles": "static", "weight_streaming": True}},
    )
    plain = dataclasses.replace(
        streaming, build_options={"tensorrt": {"profiles": "dynamic", "weight_streaming": False}}
    )
    fields = {f.name: None for f in dataclasses.fields(Manifest) if f.default is dataclasses.MISSING}
    for artifact, flags in ((streaming, " --profiles static --weight-streaming"), (plain, "")):
        m = Manifest(**{**fields, "model": "tiny", "artifacts": (artifact,)})  # type: ignore[arg-type]
        assert (
            rebuild_command(m, Path("build/x"))
            == f"kontext build --model tiny{flags} --build build/x --force"
        )

"""engine.load(vram=...) end to end on a CPU: a plan with every lever applied by the runtime and an edit
through it (against the resident edit), the plan on the engine and on the server's /readyz."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.memory.plan import GIB, Levers, evaluate
from engine.memory.sizes import model_sizes
from engine.memory.streaming import is_streamed
from engine.memory.text_encoder import OffloadedEncoder
from engine.request import EditRequest
from engine.runtime import load
from tests.conftest import gradient_image

EVERY_LEVER = Levers(t5="released", fp8=True, vae_tiled=True, streamed=True)


def test_load_applies_every_lever_and_edits_within_the_fp8_bound():
    request = EditRequest.of(gradient_image(96, 80), "add a hat", seed=1, steps=3)
    with load("tiny", device="cpu") as resident:
        assert resident.memory_plan is None
        ref = resident.edit(request)
    plan = evaluate(model_sizes("tiny"), EVERY_LEVER, GIB)
    with load("tiny", device="cpu", vram=plan) as planned:
        assert planned.memory_plan is plan
        c = planned.components
        assert is_streamed(c.transformer) and isinstance(c.text_encoder_2, OffloadedEncoder)
        assert c.vae.use_tiling
        out = planned.edit(request)
    err = ((out.latents - ref.latents).norm() / ref.latents.norm()).item()
    assert 0 < err < 0.05  # FP8 storage's rounding through 3 steps (measured ~0.01); streaming adds none


def test_a_resident_plan_changes_nothing_and_reaches_readyz(tmp_path: Path):
    from engine.serve.editor import LocalEditor
    from tests.serve_harness import serve

    kontext = load("tiny", device="cpu", vram=1)  # tiny fits a 1 GiB card whole
    plan = kontext.memory_plan
    assert plan is not None and plan.fits and plan.resident
    assert not is_streamed(kontext.components.transformer)
    with serve(tmp_path, lambda: LocalEditor(kontext)) as s, s.client() as c:
        body = c.get("/readyz").json()
    assert body["memory"] == plan.to_json()
    assert body["memory"]["components"]["transformer"]["placement"] == "resident"
    kontext.close()


@pytest.mark.slow
def test_streaming_composes_with_regional_compile():
    """A streamed transformer under torch_mode compile: the scheduler's calls stay outside the compiled
    frames (torch._dynamo.disable), and the edit matches the eager resident one."""
    request = EditRequest.of(gradient_image(96, 80), "add a hat", seed=1, steps=2)
    with load("tiny", device="cpu") as resident:
        ref = resident.edit(request)
    plan = evaluate(model_sizes("tiny"), Levers(streamed=True), GIB)
    with load("tiny", device="cpu", vram=plan, torch_mode="compile") as planned:
        assert is_streamed(planned.components.transformer)
        out = planned.edit(request)
    err = ((out.latents - ref.latents).norm() / ref.latents.norm()).item()
    assert err < 1e-4  # inductor's fp32 kernels differ from eager by rounding only


def test_a_checkpoint_under_a_plan_is_read_into_host_memory_first(tmp_path: Path, monkeypatch):
    """A local checkpoint whose plan keeps something off the card skips the whole-model room check (the
    plan made it) and loads on the host; apply_plan places it. The edit is the resident load's."""
    from engine.memory.plan import GIB as gib
    from engine.model import checkpoints
    from engine.model.checkpoints import save_diffusers
    from engine.model.load import load_components

    folder = save_diffusers(load_components("tiny"), tmp_path / "tiny-ckpt")
    request = EditRequest.of(gradient_image(96, 80), "add a hat", seed=1, steps=2)
    with load(folder, device="cpu") as resident:
        ref = resident.edit(request)

    def no_room(what, need, device):  # type: ignore[no-untyped-def]
        raise AssertionError("the whole-model room check ran")

    monkeypatch.setattr(checkpoints, "require_room", no_room)
    plan = evaluate(model_sizes("tiny"), Levers(t5="cpu", streamed=True), gib)
    with load(folder, device="cpu", vram=plan) as planned:
        assert is_streamed(planned.components.transformer)
        out = planned.edit(request)
    assert torch.equal(out.latents, ref.latents)  # streaming and T5 on the CPU change no number
    with pytest.raises(AssertionError, match="room check ran"):
        load(folder, device="cpu")  # negative control: without a plan the check runs

"""The build's shape keys beyond the default (kontext build --refs / --batch) and LoRAs fused before
export (kontext build --lora): the keys, the TensorRT profiles over them, reference samples for every
key, verification of every key through the runtime's Denoiser, an edit with a reference at batch 2
served by the built engine, the no-op hash of the default build unchanged, and a LoRA build that
invalidates on a scale change and refuses to load without its LoRA."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from engine.backends.inputs import input_shapes
from engine.backends.tensorrt_plans import (
    MAX_STATIC_PROFILES,
    family_profiles,
    opt_key,
    profile_shapes,
    tensorrt_module,
)
from engine.buckets import ShapeKey, family_shape_keys, reference_bucket, reference_buckets, tokens
from engine.builder import builder
from engine.builder.builder import BuildOptions, build, build_keys
from engine.builder.calibrate import reference_edit
from engine.builder.request import Target, request_hash
from engine.calibration import CalibrationSpec
from engine.cli import main
from engine.errors import BuildError, ConfigError, ManifestError
from engine.info import describe
from engine.manifest import read_manifest, rebuild_command
from engine.metrics import rel_l2
from engine.model.components import Components
from engine.model.lora import LoraSpec
from engine.runtime import load

from .conftest import BUILD_TEST_CALIBRATION, gradient_image
from .test_lora import diffusers_lora

TEXT = 32  # the tiny preset's T5 tokens
LIGHT = CalibrationSpec(edits=1, steps=1)  # fp32-only builds: calibration feeds nothing but int8
PROMPT = "add a red hat"


def _build(tiny: Components, out: Path, **options) -> object:
    return build(
        "tiny",
        out_dir=out,
        precisions=("fp32",),
        backend="onnxruntime",
        components=tiny,
        options=BuildOptions(calibration=LIGHT, progress=False, **options),
    )


# ----------------------------------------------------------------------------- keys and profiles


def test_build_keys_are_the_union_over_refs_and_batches():
    assert build_keys("tiny", TEXT, (0,), (1,)) == sorted(family_shape_keys("tiny", TEXT))
    keys = build_keys("tiny", TEXT, (0, 1), (1, 2))
    want = {k for r in (0, 1) for b in (1, 2) for k in family_shape_keys("tiny", TEXT, batch=b, refs=r)}
    assert keys == sorted(want) and len(keys) == (4 + 24) * 2
    assert {k.batch for k in keys} == {1, 2} and any(k.context_tokens > k.target_tokens for k in keys)
    assert len(family_shape_keys("1mp", 512, refs=1)) == 81  # 9 token counts x 9 reference totals
    assert len(build_keys("1mp", 512, (0, 1), (1,))) == 9 + 81


def test_build_options_refuse_bad_counts_and_sort():
    assert (BuildOptions(refs=(1, 0, 1)).refs, BuildOptions(batches=(4, 1, 2)).batches) == ((0, 1), (1, 2, 4))
    with pytest.raises(BuildError, match="--refs takes counts from 0 to 3"):
        BuildOptions(refs=(4,))
    with pytest.raises(BuildError, match="--batch takes batch sizes >= 1"):
        BuildOptions(batches=(0,))


def test_default_request_hash_is_unchanged(monkeypatch):
    """The hash of a default request is the one every build made before --refs/--batch/--lora recorded,
    so their no-op fast path still holds; explicit defaults hash alike; new values change it."""
    versions, target = {"torch": "2"}, Target("onnxruntime", "1.0")

    def request(opts: BuildOptions) -> str:
        opts = dataclasses.replace(opts, device="cpu").resolved()  # as build() resolves it on a CPU
        recipes = builder._recipes(("fp32",), "onnxruntime", opts)
        return request_hash("tiny", None, ("fp32",), "tiny", target, versions, recipes, opts)

    default = request(BuildOptions())
    # the value before this change (main at b3ce5b3), computed the same way
    assert default == "98da2d63a8dc8f8a923861c111badac3aede22c21cd8d73d83e8a23b00bf96f7"
    assert request(BuildOptions(refs=(0,), batches=(1,), loras=())) == default
    assert request(BuildOptions(refs=(0, 1))) != default != request(BuildOptions(batches=(1, 2)))
    with pytest.raises(BuildError, match="resolved"):  # device and dtype are part of the request
        request_hash("tiny", None, ("fp32",), "tiny", target, versions, [], BuildOptions())


def test_dynamic_profile_spans_batch_and_context():
    from engine.config import PRESETS

    cfg = PRESETS["tiny"].transformer
    keys = build_keys("tiny", TEXT, (0, 1), (1, 2))
    assert set(family_profiles(keys, "dynamic").values()) == {0}
    shapes = profile_shapes(cfg, keys, "tiny")
    lo, opt, hi = shapes["hidden_states"]
    longest = max(k.image_tokens for k in keys)
    assert (lo[0], hi[0]) == (1, 2) and hi[1] == longest and lo[1] == min(k.image_tokens for k in keys)
    assert opt == input_shapes(cfg, opt_key(keys, "tiny"))["hidden_states"]
    assert opt_key(keys, "tiny") == ShapeKey(1, 64, 64, TEXT)  # the single edit at the square bucket
    for name, (lo, _, hi) in shapes.items():  # every key's every input lies within the profile
        for k in keys:
            dims = input_shapes(cfg, k)[name]
            assert all(a <= d <= b for a, d, b in zip(lo, dims, hi, strict=True)), (name, k)


def test_static_profiles_are_refused_beyond_the_limit():
    keys = build_keys("tiny", TEXT, (0, 1), (1, 2, 4))
    assert len(keys) > MAX_STATIC_PROFILES
    with pytest.raises(ConfigError, match="--profiles dynamic"):
        family_profiles(keys, "static")
    few = build_keys("tiny", TEXT, (0,), (1, 2))
    assert sorted(family_profiles(few, "static").values()) == list(range(len(few)))


def test_reference_edits_hit_their_keys_exactly():
    """Every multi-reference key of tiny (1 to 3 references) gets images at buckets that map to
    themselves, and token counts that add up to the key."""
    for r in (1, 2, 3):
        for key in family_shape_keys("tiny", TEXT, refs=r):
            image, refs = reference_edit(key, "tiny", (r,), seed=0)
            assert tokens(*image.size) == key.target_tokens
            assert 1 <= len(refs) <= r
            n = len(refs)
            assert all(reference_bucket(*x.size, "tiny", n) == x.size for x in refs)
            assert all(x.size in reference_buckets("tiny", n) for x in refs)
            assert tokens(*image.size) + sum(tokens(*x.size) for x in refs) == key.context_tokens


# ----------------------------------------------------------------------------- a refs x batch build


@pytest.fixture(scope="module")
def keyed_build(tiny: Components, tiny_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_build brought to refs 0,1 x batch 1,2 (fp32): its export and calibration are reused; the
    reference stage captures the 52 new keys, and the fp32 artifact is verified on all 56."""
    out = tmp_path_factory.mktemp("keys") / "tiny"
    shutil.copytree(tiny_build, out)
    m = build(
        "tiny",
        out_dir=out,
        precisions=("fp32",),
        backend="onnxruntime",
        components=tiny,
        options=BuildOptions(
            calibration=CalibrationSpec(**BUILD_TEST_CALIBRATION), progress=False, refs=(0, 1), batches=(1, 2)
        ),
    )
    assert m.stages["export"] == read_manifest(tiny_build).stages["export"]  # the keys do not re-export
    return out


@pytest.mark.slow  # the 56-key build (keyed_build)
def test_a_refs_and_batch_build_verifies_every_key(keyed_build):
    m = read_manifest(keyed_build)
    keys = {str(k) for k in build_keys("tiny", TEXT, (0, 1), (1, 2))}
    (art,) = m.artifacts
    assert set(art.profiles) == keys and set(art.verification) == keys
    assert all(v.rel_l2 <= v.bound == 1e-4 and v.samples == 2 for v in art.verification.values())
    assert (m.refs, m.batches, m.loras) == ((0, 1), (1, 2), ())
    assert "--refs 0,1 --batch 1,2" in rebuild_command(m, keyed_build)
    assert "serves 0,1 reference image(s), batch 1,2" in describe(keyed_build)


@pytest.mark.slow  # the 56-key build (keyed_build)
def test_an_edit_with_a_reference_at_batch_2_runs_on_the_engine(keyed_build, tiny_engine):
    image, ref = gradient_image(128, 128, seed=3), gradient_image(96, 160, seed=4)
    kwargs = {"seed": 5, "steps": 2, "references": [ref], "num_images": 2}
    with load(keyed_build, precision="fp32") as kontext:
        out = kontext.edit(image, PROMPT, **kwargs)
        stats = kontext.stats()
    assert out.shape_key == ShapeKey(2, 64, 64 + 60, TEXT) and stats.misses == 0 and stats.hits >= 1
    torch_out = tiny_engine.edit(image, PROMPT, **kwargs)
    assert rel_l2(out.latents.numpy(), torch_out.latents.numpy()) <= 1e-4


@pytest.mark.slow  # the 56-key build (keyed_build)
def test_cli_build_with_refs_and_batch_reuses_every_stage(keyed_build, tmp_path, capsys):
    out = tmp_path / "tiny"
    shutil.copytree(keyed_build, out)
    before = read_manifest(out).stages
    args = [
        "build",
        "--model",
        "tiny",
        "--build",
        str(out),
        "--precision",
        "fp32",
        "--backend",
        "onnxruntime",
        "--refs",
        "1,0",
        "--batch",
        "2,1",
        "--calib-edits",
        "4",
        "--calib-steps",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    assert "fp32: onnxruntime/transformer_fp32.onnx (onnxruntime, 56 shape keys" in capsys.readouterr().out
    assert read_manifest(out).stages == before  # the same request spelled otherwise: nothing re-ran
    assert main(["info", str(out)]) == 0
    assert "with 1 reference(s): " in capsys.readouterr().out


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.slow  # two whole builds
def test_a_lora_build_invalidates_on_scale_and_refuses_to_load_without_it(tiny, tmp_path):
    lora = tmp_path / "style.safetensors"
    diffusers_lora(tiny, lora)
    out = tmp_path / "lora"
    first = _build(copy.deepcopy(tiny), out, loras=(LoraSpec(lora, 0.5),))
    assert [(Path(x["path"]).name, x["scale"]) for x in first.loras] == [("style.safetensors", 0.5)]
    assert first.weights_id != tiny.weights_id and len(first.loras[0]["sha256"]) == 64
    again = _build(copy.deepcopy(tiny), out, loras=(LoraSpec(lora, 0.5),))
    assert again.stages == first.stages  # the no-op path: nothing ran
    second = _build(copy.deepcopy(tiny), out, loras=(LoraSpec(lora, 1.0),))
    assert second.weights_id != first.weights_id
    for stage in ("export", "golden", "compile:fp32", "verify:fp32"):  # each ran on the new weights
        assert second.stages[stage].inputs != first.stages[stage].inputs, stage
    with pytest.raises(ManifestError, match=r"style\.safetensors at scale 1.*--lora .*style\.safetensors:1"):
        load(out, precision="fp32")
    with pytest.raises(ManifestError, match=r"style\.safetensors"):
        load(out, precision="fp32", loras=[LoraSpec(lora, 0.5)])
    with load(out, precision="fp32", loras=[f"{lora}:1"]) as kontext:
        result = kontext.edit(gradient_image(128, 128), PROMPT, steps=1)
        assert kontext.stats().misses == 0 and result.latents.isfinite().all()


def test_a_build_without_lora_refuses_a_lora_at_load(tiny_build, tiny, tmp_path):
    lora = tmp_path / "style.safetensors"
    diffusers_lora(tiny, lora)
    with pytest.raises(ManifestError, match=r"was built from weights .* built without LoRAs \(drop"):
        load(tiny_build, precision="fp32", loras=[LoraSpec(lora)])


def test_manifest_without_the_new_fields_reads_as_defaults(tiny_build):
    import json

    data = json.loads((tiny_build / "manifest.json").read_text())
    for name in ("refs", "batches", "loras"):
        data.pop(name, None)
    from engine.manifest import Manifest

    m = Manifest.from_dict(data)
    assert (m.refs, m.batches, m.loras) == ((0,), (1,), ())
    assert dataclasses.replace(m, refs=(0,)) == m


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(
    not (tensorrt_module() is not None and torch.cuda.is_available()),
    reason="needs TensorRT and a CUDA device",
)
def test_tensorrt_refs_and_batch_build(tmp_path: Path, tiny: Components) -> None:
    """One dynamic profile over refs 0,1 x batch 1,2 (56 keys), every key verified through TrtDenoiser
    with its CUDA graph, fp32 with TF32 cleared."""
    options = BuildOptions(calibration=LIGHT, progress=False, refs=(0, 1), batches=(1, 2))
    m = build(
        "tiny", out_dir=tmp_path, precisions=("fp32",), backend="tensorrt", components=tiny, options=options
    )
    (art,) = m.artifacts
    assert art.profile_mode == "dynamic" and set(art.profiles.values()) == {0} and len(art.profiles) == 56
    assert set(art.verification) == set(art.profiles)
    assert all(v.rel_l2 <= v.bound for v in art.verification.values())


# ----------------------------------------------------------------------------- the build's torch dtype


@pytest.mark.slow  # a whole build
def test_a_bf16_build_verifies_its_fp32_graph_and_gives_the_weights_back_in_bf16(tiny, tmp_path, monkeypatch):
    """What a GPU build does by default (BuildOptions.resolved: cuda, bf16), run on the CPU: the weights
    held in bf16 and calibrated in bf16 (no fp32 copy of a 12B model), the graph exported and the
    reference taken in fp32 (an exact round trip), verified."""
    from engine.builder import calibrate

    calibrated_in: list[torch.dtype] = []

    def spy(*args, **kwargs):
        calibrated_in.append(kwargs["dtype"])
        return run_calibration(*args, **kwargs)

    run_calibration = calibrate.run_calibration
    monkeypatch.setattr(calibrate, "run_calibration", spy)
    comps = dataclasses.replace(tiny, transformer=copy.deepcopy(tiny.transformer))
    comps = dataclasses.replace(comps, vae=copy.deepcopy(tiny.vae))
    for m in (comps.transformer, comps.vae):
        torch.nn.Module.to(m, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in comps.transformer.state_dict().items()}
    m = _build(comps, tmp_path / "bf16", device="cpu", dtype="bf16")
    (artifact,) = m.artifacts
    assert artifact.verification and max(v.rel_l2 for v in artifact.verification.values()) < 1e-4
    after = comps.transformer.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k]) for k in before)
    assert next(comps.vae.parameters()).dtype == torch.bfloat16
    assert calibrated_in == [torch.bfloat16]

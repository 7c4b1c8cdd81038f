"""Local checkpoints, positive cases: the tiny preset written as a diffusers folder and as BFL's single
file loads back through `load_components(PATH)` with every tensor equal and bit-identical edits; the
BFL key mapping agrees with diffusers' converter value for value at the real model's sizes."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.backends.torch import TorchDenoiser
from engine.config import KONTEXT_DEV_TRANSFORMER, PRESETS
from engine.errors import WeightsError
from engine.model.bfl import BFL_FILE, from_bfl, save_bfl, to_bfl
from engine.model.checkpoints import local_preset, save_diffusers
from engine.model.components import Components
from engine.model.layout import SIDECAR
from engine.model.load import load_components
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image


@pytest.fixture(scope="module")
def tiny_folder(tiny: Components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_diffusers(tiny, tmp_path_factory.mktemp("ckpt") / "tiny-diffusers")


@pytest.fixture(scope="module")
def tiny_bfl(tiny: Components, tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BFL's file inside a copy of the folder whose transformer/ keeps only its config: the transformer's
    weights can only come from the single file."""
    import shutil

    folder = tmp_path_factory.mktemp("ckpt") / "tiny-bfl"
    shutil.copytree(tiny_folder, folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    return save_bfl(tiny.transformer, folder / BFL_FILE)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def edit_latents(c: Components) -> torch.Tensor:
    pipe = KontextPipeline(c, TorchDenoiser(c.transformer))
    result = pipe.edit(EditRequest(gradient_image(96, 64), "add a red hat", steps=2, seed=7), progress=False)
    return result.latents


def test_diffusers_folder_loads_back_identical(tiny, tiny_folder):
    components = [
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "transformer",
        "vae",
    ]
    assert sorted(p.name for p in tiny_folder.iterdir()) == sorted([SIDECAR, "model_index.json", *components])
    assert not list(tiny_folder.parent.glob(".*.tmp")) and not list(tiny_folder.parent.glob(".tiny-*"))
    loaded = load_components(tiny_folder)
    for a, b in zip(tiny.modules(), loaded.modules(), strict=True):
        assert_same_weights(a, b)
    for tok in ("tokenizer", "tokenizer_2"):
        prompt = "Add a RED hat, 2x!"
        assert getattr(loaded, tok)(prompt).input_ids == getattr(tiny, tok)(prompt).input_ids
    # a non-real configuration keeps its own family and text length (kontext.json)
    p = loaded.preset
    assert (p.transformer, p.bucket_family, p.max_sequence_length) == (tiny.preset.transformer, "tiny", 32)
    assert not p.synthetic and loaded.source == str(tiny_folder.resolve())
    assert torch.equal(edit_latents(loaded), edit_latents(tiny))


def test_bfl_single_file_loads_back_identical(tiny, tiny_bfl):
    from safetensors import safe_open

    with safe_open(tiny_bfl, "pt") as f:
        keys = set(f.keys())
    h = tiny.preset.transformer.hidden_size
    assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"} <= keys
    with safe_open(tiny_bfl, "pt") as f:
        assert f.get_slice("single_blocks.0.linear1.weight").get_shape() == [3 * h + 4 * h, h]
    loaded = load_components(tiny_bfl)
    assert_same_weights(tiny.transformer, loaded.transformer)
    assert loaded.preset.bucket_family == "tiny"
    assert torch.equal(edit_latents(loaded), edit_latents(tiny))


def test_bfl_mapping_agrees_with_diffusers_converter_at_real_sizes():
    """diffusers' converter fixes the single-block split at 3072, so the check uses the real row counts
    with two input columns: every tensor's values must survive ours -> BFL -> diffusers' converter."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = dataclasses.replace(KONTEXT_DEV_TRANSFORMER, num_layers=2, num_single_layers=2)
    with torch.device("meta"):
        layout = FluxTransformer2DModel(**cfg.to_diffusers()).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn((v.shape[0], 2)[: v.ndim], generator=g) for k, v in layout.items()}
    bfl = to_bfl(sd)
    assert bfl["single_blocks.1.linear1.weight"].shape == (21504, 2)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = from_bfl({"model.diffusion_model." + k: v for k, v in bfl.items()})  # ComfyUI's prefix too
    assert theirs.keys() == ours.keys() == sd.keys()
    for k in sd:
        assert torch.equal(theirs[k], sd[k]) and torch.equal(ours[k], sd[k]), k


def test_mapping_refuses_what_it_cannot_place(tiny):
    bfl = to_bfl(tiny.transformer.state_dict())
    with pytest.raises(WeightsError, match="no counterpart"):
        from_bfl({**bfl, "double_blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="not a BFL"):
        from_bfl({"x_embedder.weight": torch.zeros(1)})


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tiny, tiny_bfl, tmp_path):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(tiny_bfl.parent, folder)
    from diffusers import FluxTransformer2DModel

    deeper = dataclasses.replace(tiny.preset.transformer, num_single_layers=3)
    save_bfl(FluxTransformer2DModel(**deeper.to_diffusers()), folder / BFL_FILE)
    with pytest.raises(WeightsError, match="does not match its transformer config"):
        load_components(folder / BFL_FILE)


def test_local_preset_comes_from_the_transformer_config(tiny_folder, tmp_path, caplog):
    real = tmp_path / "real"
    (real / "transformer").mkdir(parents=True)
    (real / "transformer" / "config.json").write_text(json.dumps(KONTEXT_DEV_TRANSFORMER.to_diffusers()))
    assert local_preset(real) is PRESETS["kontext-dev"]
    # no sidecar and a non-real config: the real model's family and length, said in a warning
    odd = tmp_path / "odd"
    (odd / "transformer").mkdir(parents=True)
    (odd / "transformer" / "config.json").write_text(
        (tiny_folder / "transformer" / "config.json").read_text()
    )
    with caplog.at_level(logging.WARNING, logger="engine.model.checkpoints"):
        p = local_preset(odd)
    assert (p.bucket_family, p.max_sequence_length, p.transformer.num_layers) == ("1mp", 512, 1)
    assert SIDECAR in caplog.text
    (odd / SIDECAR).write_text("{not json")
    with pytest.raises(WeightsError, match=SIDECAR):
        local_preset(odd)


class _Float32Allocations(TorchDispatchMode):
    """Records every float32 tensor of 256+ elements an op produces off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            big = isinstance(o, torch.Tensor) and o.numel() >= 256
            if big and o.dtype == torch.float32 and o.device.type != "meta":
                self.seen[str(func)] += 1
        return out


def test_loading_bf16_makes_no_fp32_copy(tiny, tmp_path):
    folder = save_diffusers(load_components("tiny", dtype=torch.bfloat16), tmp_path / "bf16")
    save_bfl(load_components("tiny", dtype=torch.bfloat16).transformer, folder / BFL_FILE)
    for path in (folder, folder / BFL_FILE):
        with _Float32Allocations() as rec:
            loaded = load_components(path, dtype=torch.bfloat16)
        assert not rec.seen, rec.seen
        assert {p.dtype for m in loaded.modules() for p in m.parameters()} == {torch.bfloat16}
    with _Float32Allocations() as rec:  # the recorder sees fp32 work when there is some
        load_components(folder, dtype=torch.float32)
    assert rec.seen


@pytest.mark.gpu
def test_local_checkpoint_loads_straight_onto_the_gpu_in_bf16(tiny, tiny_bfl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for path in (tiny_bfl.parent, tiny_bfl):
        loaded = load_components(path, dtype=torch.bfloat16, device="cuda")
        for m in loaded.modules():
            assert {(p.device.type, p.dtype) for p in m.parameters()} == {("cuda", torch.bfloat16)}
        ref = {k: v.to("cuda", torch.bfloat16) for k, v in tiny.transformer.state_dict().items()}
        got = loaded.transformer.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)

"""Presets: deterministic synthetic weights, eval mode, and typed errors for missing real weights."""

from __future__ import annotations

import pytest
import torch

from engine.config import PRESETS
from engine.errors import WeightsError
from engine.model.components import fingerprint_module
from engine.model.load import load_components
from engine.model.synthetic import build_modules, build_synthetic
from engine.model.tokenizers import build_tokenizers


def test_tiny_is_deterministic_and_in_eval_mode(tiny):
    again = build_synthetic(PRESETS["tiny"])
    assert again.weights_id == tiny.weights_id
    for a, b in zip(
        tiny.transformer.state_dict().values(), again.transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for m in (tiny.transformer, tiny.vae, tiny.text_encoder, tiny.text_encoder_2):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())


def test_tiny_weights_do_not_depend_on_global_rng(tiny):
    torch.manual_seed(12345)
    before = torch.random.get_rng_state()
    again = build_synthetic(PRESETS["tiny"])
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left untouched
    assert again.weights_id == tiny.weights_id


def test_fingerprint_changes_with_one_weight(tiny):
    clone = build_synthetic(PRESETS["tiny"]).transformer
    with torch.no_grad():
        next(iter(clone.parameters())).view(-1)[0] += 1e-3
    assert fingerprint_module(clone) != tiny.weights_id


def test_tokenizers_are_built_offline(tiny):
    clip = tiny.tokenizer(["add a hat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    t5 = tiny.tokenizer_2(["add a hat"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    assert clip.shape == (1, 77) and t5.shape == (1, 32)
    assert clip[0, 0] == tiny.tokenizer.bos_token_id and t5[0, -1] == tiny.tokenizer_2.pad_token_id


def test_tiny_components_fit_together(tiny):
    t = tiny.transformer.config
    assert t.in_channels == 64 and t.guidance_embeds
    assert tiny.vae.config.latent_channels == 16
    assert tiny.text_encoder.config.hidden_size == t.pooled_projection_dim
    assert tiny.text_encoder_2.config.d_model == t.joint_attention_dim


def test_small_preset_is_transformer_dominated():
    """small exists so CPU backend comparisons measure the transformer: it must hold nearly every weight."""
    preset = PRESETS["small"]
    tokenizers = build_tokenizers()
    with torch.device("meta"):
        modules = build_modules(preset, *tokenizers, seed=None)
    transformer, *others = (sum(p.numel() for p in m.parameters()) for m in modules)
    assert transformer > 10 * sum(others)


def test_presets_are_switched_on_synthetic_not_names():
    synthetic = [n for n, p in PRESETS.items() if p.synthetic]
    assert {"tiny", "small", "full"} <= set(synthetic) and not PRESETS["kontext-dev"].synthetic
    with pytest.raises(WeightsError, match=r"neither a preset \(tiny, small, full\)"):
        load_components("sd15")


@pytest.mark.parametrize("model", ["kontext-dev", "/nonexistent/flux", "sd15"])
def test_missing_real_weights_say_where_to_get_them(model):
    with pytest.raises(
        WeightsError, match=r"`hf download black-forest-labs/FLUX\.1-Kontext-dev .*--exclude ae\.safetensors`"
    ):
        load_components(model)


def test_pickle_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "flux1-kontext-dev.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(WeightsError, match=r"only \.safetensors"):
        load_components(ckpt)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(WeightsError, match=r"model_index\.json"):
        load_components(tmp_path)


def test_unknown_preset_names_the_presets_or_the_download():  # bad edit values: tests/test_request.py
    with pytest.raises(WeightsError, match=r"'huge' is neither a preset \(tiny, small, full\)") as e:
        load_components("huge")
    assert "hf download black-forest-labs/FLUX.1-Kontext-dev" in str(e.value)

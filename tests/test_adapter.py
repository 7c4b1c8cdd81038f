"""The diffusers adapter: our built engine as FluxKontextPipeline.transformer (built, not patched)
gives the same latents as our pipeline with that engine (1e-5, fp32)."""

from __future__ import annotations

import logging

import pytest
import torch

import engine
from engine.adapters import DenoiserTransformer, as_transformer, diffusers_call
from engine.errors import ConfigError
from engine.request import EditRequest

from .conftest import gradient_image

PROMPT = "add a red hat to the cat"
TOL = 1e-5


@pytest.mark.parametrize("size", [(128, 128), (80, 192)], ids=["square", "portrait"])
def test_diffusers_with_our_engine_matches_our_pipeline(tiny_build, size):
    request = EditRequest(gradient_image(*size), PROMPT, steps=3, seed=5, size=size)
    with engine.load(tiny_build, precision="fp32") as kontext:
        ours = kontext.edit(request).latents
        pipe = engine.kontext_pipeline(kontext)
        assert isinstance(pipe.transformer, DenoiserTransformer)
        pipe.set_progress_bar_config(disable=True)
        text_tokens = kontext.components.preset.max_sequence_length
        theirs = pipe(**diffusers_call(request, text_tokens), output_type="latent").images
        assert kontext.stats().hits == 1 + 3  # one edit, then one count per diffusers transformer call
    assert theirs.shape == ours.shape
    err = (theirs - ours).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3g} > {TOL}"


def test_adapter_looks_like_the_transformer(tiny_build):
    with engine.load(tiny_build, precision="fp32") as kontext:
        t = as_transformer(kontext)
        assert t.config.in_channels == 64 and t.config.guidance_embeds
        assert t.dtype == torch.float32 and t.device == torch.device("cpu")
        x = dict(
            hidden_states=torch.zeros(1, 128, 64),
            encoder_hidden_states=torch.zeros(1, 32, 32),
            pooled_projections=torch.zeros(1, 32),
            timestep=torch.full((1,), 0.5),
            img_ids=torch.zeros(128, 3),
            txt_ids=torch.zeros(32, 3),
            guidance=torch.full((1,), 2.5),
        )
        out = t(**x)
        assert out.sample.shape == (1, 128, 64)
        assert torch.equal(t(**x, return_dict=False)[0], out.sample)
        with pytest.raises(ConfigError, match="joint_attention_kwargs"):
            t(**x, joint_attention_kwargs={"scale": 0.5})
        with pytest.raises(ConfigError, match="guidance"):
            t(**{**x, "guidance": None})


def test_kontext_pipeline_warns_that_it_skips_the_safety_policy(tiny_engine, caplog):
    """diffusers' pipeline runs no filters and writes no metadata: with a policy on, loading it says so."""
    from engine.safety import build_policy

    with caplog.at_level(logging.WARNING, logger="engine.adapters"):
        engine.kontext_pipeline(tiny_engine)
        assert "skips" not in caplog.text  # policy off (a random preset): nothing skipped
        tiny_engine.safety = build_policy("review")
        engine.kontext_pipeline(tiny_engine)
    assert "skips the engine's safety policy (review)" in caplog.text

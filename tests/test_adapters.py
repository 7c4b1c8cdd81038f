"""The diffusers adapter (engine.adapters, docs/diffusers.md).

Our built engine as FluxKontextPipeline.transformer gives our pipeline's latents (1e-5, fp32). A torch-backed
adapter is a diffusers citizen: bit-identical latents to the stock transformer in both guidance configs,
a pipeline save that stock FluxTransformer2DModel loads, `.to(dtype)` that reaches the weights, diffusers'
caches. A built (ONNX Runtime) adapter refuses what it cannot do, in one line.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import engine
from engine.adapters import DenoiserTransformer, as_transformer, diffusers_call
from engine.errors import BackendUnavailableError, ConfigError
from engine.request import EditRequest

from .conftest import gradient_image

PROMPT = "add a red hat to the cat"
TOL = 1e-5


# ------------------------------------------------------------------ a built engine inside diffusers


@pytest.mark.parametrize("size", [(128, 128), (80, 192)], ids=["square", "portrait"])
def test_diffusers_with_our_engine_matches_our_pipeline(tiny_build, size):
    request = EditRequest(gradient_image(*size), PROMPT, steps=3, seed=5, size=size)
    with engine.load(tiny_build, precision="fp32") as kontext:
        ours = kontext.edit(request).latents
        pipe = engine.kontext_pipeline(kontext)
        assert isinstance(pipe.transformer, DenoiserTransformer) and not pipe.transformer.stock
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
        with pytest.raises(BackendUnavailableError, match="joint_attention_kwargs"):
            t(**x, joint_attention_kwargs={"scale": 0.5})
        with pytest.raises(ConfigError, match="guidance"):
            t(**{**x, "guidance": None})


def test_a_built_adapter_refuses_what_it_cannot_do_in_one_line(tiny_build, tmp_path):
    from diffusers import FirstBlockCacheConfig
    from diffusers.models.attention_processor import AttnProcessor2_0

    with engine.load(tiny_build, precision="fp32") as kontext:
        t = as_transformer(kontext)
        assert not t.stock and list(t.parameters()) == []
        assert t.to("cpu") is t and t.to(torch.float32) is t  # its own device and dtype: nothing to do
        refusals = {
            "save_pretrained": lambda: t.save_pretrained(tmp_path / "t"),
            "change its dtype (fp32 to bf16)": lambda: t.to(torch.bfloat16),
            "move from cpu to meta": lambda: t.to("meta"),
            "enable_cache": lambda: t.enable_cache(FirstBlockCacheConfig(threshold=0.1)),
            "expose attention processors": lambda: t.attn_processors,
            "set_attn_processor": lambda: t.set_attn_processor(AttnProcessor2_0()),
            "fuse_qkv_projections": lambda: t.fuse_qkv_projections(),
            "enable_layerwise_casting": lambda: t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn),
            "enable_group_offload": lambda: t.enable_group_offload(torch.device("cpu")),
        }
        for what, call in refusals.items():
            with pytest.raises(BackendUnavailableError) as e:
                call()
            message = str(e.value)
            assert (
                f"over dispatch(onnxruntime-fp32) cannot {what}" in message and "backend='torch'" in message
            )
            assert "\n" not in message
        with pytest.raises(BackendUnavailableError, match="IP-Adapter"):
            t._load_ip_adapter_weights({})
        assert not (tmp_path / "t").exists()


def test_kontext_pipeline_warns_that_it_skips_the_safety_policy(tiny_engine, caplog):
    """diffusers' pipeline runs no filters and writes no metadata: with a policy on, loading it says so."""
    from engine.safety import build_policy

    with caplog.at_level(logging.WARNING, logger="engine.adapters"):
        engine.kontext_pipeline(tiny_engine)
        assert "skips" not in caplog.text  # policy off (a random preset): nothing skipped
        tiny_engine.safety = build_policy("review")
        engine.kontext_pipeline(tiny_engine)
    assert "skips the engine's safety policy (review)" in caplog.text


# ------------------------------------------------------------------ a torch adapter is a diffusers citizen


def stock_transformer(tiny, guidance_embeds: bool):
    """A fresh seeded FluxTransformer2DModel of the tiny preset's shape, with or without guidance."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    config = {**tiny.transformer.config, "guidance_embeds": guidance_embeds}
    return FluxTransformer2DModel.from_config(config).eval()


def pipeline(tiny, transformer):
    """FluxKontextPipeline around `transformer`, with copies of the session's tiny modules (a test may
    cast or save them)."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(
        scheduler=tiny.scheduler(),
        vae=copy.deepcopy(tiny.vae),
        text_encoder=copy.deepcopy(tiny.text_encoder),
        tokenizer=tiny.tokenizer,
        text_encoder_2=copy.deepcopy(tiny.text_encoder_2),
        tokenizer_2=tiny.tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, seed: int = 5, steps: int = 2) -> torch.Tensor:
    request = EditRequest(gradient_image(64, 48), PROMPT, steps=steps, seed=seed, size=(64, 48))
    return pipe(**diffusers_call(request, 32), output_type="latent").images  # [1, N, 64]


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["no-guidance-embed", "kontext-dev"])
def test_a_torch_adapter_gives_the_stock_transformers_latents_bit_for_bit(tiny, guidance_embeds):
    """diffusers' tests' config (guidance_embeds=False: the adapter must pass diffusers' guidance=None on)
    and Kontext [dev]'s (True). Negative control: another seed differs, so equality is not vacuous."""
    stock = stock_transformer(tiny, guidance_embeds)
    adapter = DenoiserTransformer.from_module(stock)
    assert adapter.stock and adapter.config.guidance_embeds is guidance_embeds
    assert [n for n, _ in adapter.named_parameters()] == [n for n, _ in stock.named_parameters()]
    theirs = latents(pipeline(tiny, stock))
    ours = latents(pipeline(tiny, adapter))
    assert torch.equal(ours, theirs)
    assert not torch.equal(latents(pipeline(tiny, adapter), seed=6), theirs)


def test_a_pipeline_saved_with_the_adapter_loads_in_stock_diffusers(tiny, tmp_path):
    """pipe.save_pretrained writes transformer/ as a stock FluxTransformer2DModel folder (its weights
    bit for bit); the pipeline loads back with the adapter, and both give the same latents."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    stock = stock_transformer(tiny, guidance_embeds=True)
    pipe = pipeline(tiny, DenoiserTransformer.from_module(stock))
    before = latents(pipe)
    pipe.save_pretrained(tmp_path)
    assert "FluxTransformer2DModel" in (tmp_path / "transformer" / "config.json").read_text()
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert type(loaded) is FluxTransformer2DModel and loaded.config.guidance_embeds
    saved, original = loaded.state_dict(), stock.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)
    again = FluxKontextPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.transformer, DenoiserTransformer) and again.transformer.stock
    assert torch.equal(latents(again), before)


def test_to_dtype_reaches_the_wrapped_model(tiny):
    stock = stock_transformer(tiny, guidance_embeds=True)
    adapter = DenoiserTransformer.from_module(stock)
    pipe = pipeline(tiny, adapter)
    assert stock.x_embedder.weight.dtype == torch.float32
    pipe.to(torch.bfloat16)
    assert adapter.dtype == torch.bfloat16 and stock.dtype == torch.bfloat16
    assert {p.dtype for p in stock.parameters()} == {torch.bfloat16}
    assert latents(pipe).dtype == torch.bfloat16  # and it still runs, in bf16
    adapter.to(torch.float32)
    assert stock.x_embedder.weight.dtype == torch.float32


def test_diffusers_caches_run_on_a_torch_adapter(tiny):
    """enable_cache puts diffusers' own hooks on the blocks the adapter's denoiser runs, under the stock
    names: the cached latents equal the stock transformer's with the same cache bit for bit, differ from
    the uncached ones, and are the uncached ones again after disable_cache. (Pyramid Attention Broadcast,
    one of the two caches diffusers' Kontext suite tests; FluxKontextPipeline sets no cache_context, so
    the block caches that need one fail there with the stock transformer too.)"""
    from diffusers import PyramidAttentionBroadcastConfig

    def cache(pipe):
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep,
        )

    stock = stock_transformer(tiny, guidance_embeds=True)
    stock_pipe = pipeline(tiny, stock)
    stock.enable_cache(cache(stock_pipe))
    stock_cached = latents(stock_pipe, steps=4)
    stock.disable_cache()

    adapter = DenoiserTransformer.from_module(stock)
    pipe = pipeline(tiny, adapter)
    plain = latents(pipe, steps=4)
    adapter.enable_cache(cache(pipe))
    hooked = [n for n, m in adapter.named_modules() if getattr(m, "_diffusers_hook", None) and n]
    assert hooked == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    cached = latents(pipe, steps=4)
    assert torch.equal(cached, stock_cached)
    assert not torch.equal(cached, plain)
    adapter.disable_cache()
    assert torch.equal(latents(pipe, steps=4), plain)


def test_attention_processors_are_the_stock_modules_under_its_names(tiny):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    stock = stock_transformer(tiny, guidance_embeds=True)
    adapter = DenoiserTransformer.from_module(stock)
    assert adapter.attn_processors.keys() == stock.attn_processors.keys()
    processor = FluxAttnProcessor()
    adapter.set_attn_processor(processor)
    assert all(p is processor for p in stock.attn_processors.values())


def test_a_torch_engine_gives_a_stock_adapter_and_ip_adapter_is_refused(tiny_engine):
    t = as_transformer(tiny_engine)
    assert t.stock and t.transformer is tiny_engine.components.transformer
    with pytest.raises(BackendUnavailableError, match="IP-Adapter is not supported"):
        t(
            hidden_states=torch.zeros(1, 8, 64),
            encoder_hidden_states=torch.zeros(1, 4, 32),
            pooled_projections=torch.zeros(1, 32),
            timestep=torch.full((1,), 0.5),
            img_ids=torch.zeros(8, 3),
            txt_ids=torch.zeros(4, 3),
            guidance=torch.full((1,), 2.5),
            joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1, 4)]},
        )

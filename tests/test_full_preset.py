"""The `full` preset: the real FLUX.1 Kontext [dev] configuration and state-dict layout (checked on the meta
device against tables written from BFL's model code), in-memory tokenizers of the real sizes, the scaled
initialisation that keeps bf16 activations sane through all 57 blocks, and the refusal to build where
it cannot fit."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from engine.config import PRESETS, ModelPreset
from engine.errors import BackendUnavailableError
from engine.model import random_weights
from engine.model.bfl import to_bfl
from engine.model.components import Components
from engine.model.load import load_components
from engine.model.synthetic import build_modules, build_on_device
from engine.model.tokenizers import build_tokenizers
from engine.sampling import image_ids

FULL = PRESETS["full"]
log = logging.getLogger(__name__)


def meta_modules(preset: ModelPreset = FULL) -> tuple[torch.nn.Module, ...]:
    clip, t5 = build_tokenizers(preset.text.clip_vocab, preset.text.t5_vocab) if preset.text else (None, None)
    with torch.device("meta"):
        return build_modules(preset, clip, t5, seed=None)


# --------------------------------------------------------------------------- the real layout, from BFL's code


def bfl_layout(
    h: int = 3072, heads: int = 24, depth: int = 19, single: int = 38
) -> dict[str, tuple[int, ...]]:
    """Every tensor of BFL's Flux (src/flux/model.py, modules/layers.py) for flux-dev-kontext: in_channels 64,
    vec_in_dim 768, context_in_dim 4096, mlp_ratio 4, qkv_bias, guidance_embed."""
    mlp, hd = 4 * h, h // heads

    def lin(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}

    t = {**lin("img_in", h, 64), **lin("txt_in", h, 4096), **lin("final_layer.linear", 64, h)}
    t |= lin("final_layer.adaLN_modulation.1", 2 * h, h)
    for emb, inp in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        t |= lin(f"{emb}.in_layer", h, inp) | lin(f"{emb}.out_layer", h, h)
    for i in range(depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            t |= lin(f"{b}_mod.lin", 6 * h, h) | lin(f"{b}_attn.qkv", 3 * h, h) | lin(f"{b}_attn.proj", h, h)
            t |= lin(f"{b}_mlp.0", mlp, h) | lin(f"{b}_mlp.2", h, mlp)
            t |= {f"{b}_attn.norm.query_norm.scale": (hd,), f"{b}_attn.norm.key_norm.scale": (hd,)}
    for i in range(single):
        b = f"single_blocks.{i}"
        t |= (
            lin(f"{b}.linear1", 3 * h + mlp, h)
            | lin(f"{b}.linear2", h, h + mlp)
            | lin(f"{b}.modulation.lin", 3 * h, h)
        )
        t |= {f"{b}.norm.query_norm.scale": (hd,), f"{b}.norm.key_norm.scale": (hd,)}
    return t


def diffusers_layout(
    h: int = 3072, heads: int = 24, depth: int = 19, single: int = 38
) -> dict[str, tuple[int, ...]]:
    """The same model in diffusers' FluxTransformer2DModel names (the published transformer/ folder)."""
    mlp, hd = 4 * h, h // heads

    def lin(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}

    te = "time_text_embed"
    t = {**lin("x_embedder", h, 64), **lin("context_embedder", h, 4096), **lin("proj_out", 64, h)}
    t |= lin("norm_out.linear", 2 * h, h)
    for emb, inp in (("timestep_embedder", 256), ("text_embedder", 768), ("guidance_embedder", 256)):
        t |= lin(f"{te}.{emb}.linear_1", h, inp) | lin(f"{te}.{emb}.linear_2", h, h)
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        t |= lin(f"{b}.norm1.linear", 6 * h, h) | lin(f"{b}.norm1_context.linear", 6 * h, h)
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            t |= lin(f"{b}.attn.{p}", h, h)
        t |= {f"{b}.attn.{n}.weight": (hd,) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
        for ff in ("ff", "ff_context"):
            t |= lin(f"{b}.{ff}.net.0.proj", mlp, h) | lin(f"{b}.{ff}.net.2", h, mlp)
    for i in range(single):
        b = f"single_transformer_blocks.{i}"
        t |= (
            lin(f"{b}.norm.linear", 3 * h, h)
            | lin(f"{b}.proj_mlp", mlp, h)
            | lin(f"{b}.proj_out", h, h + mlp)
        )
        t |= {k: v for p in ("to_q", "to_k", "to_v") for k, v in lin(f"{b}.attn.{p}", h, h).items()}
        t |= {f"{b}.attn.norm_q.weight": (hd,), f"{b}.attn.norm_k.weight": (hd,)}
    return t


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.slow  # the 12B model built on meta, three layouts
def test_transformer_state_dict_matches_the_real_layouts_on_meta():
    transformer = meta_modules()[0]
    sd = transformer.state_dict()
    assert all(t.is_meta for t in sd.values())
    assert shapes(sd) == diffusers_layout()
    bfl = shapes(to_bfl(sd))
    assert bfl == bfl_layout()
    assert bfl["double_blocks.0.img_attn.qkv.weight"] == (9216, 3072)
    assert bfl["single_blocks.0.linear1.weight"] == (21504, 3072)
    assert bfl["img_in.weight"] == (3072, 64)
    # 11.9B parameters: the 23.8 GB of BFL's bf16 flux1-kontext-dev.safetensors
    assert sum(math.prod(s) for s in bfl.values()) == 11_901_408_320


def test_every_component_has_the_real_configuration():
    transformer, vae, clip, t5 = meta_modules()
    tc = transformer.config  # BFL util.py "flux-dev-kontext"
    assert (tc.num_layers, tc.num_single_layers, tc.num_attention_heads, tc.attention_head_dim) == (
        19,
        38,
        24,
        128,
    )
    assert (tc.in_channels, tc.joint_attention_dim, tc.pooled_projection_dim, tc.guidance_embeds) == (
        64,
        4096,
        768,
        True,
    )
    assert tuple(tc.axes_dims_rope) == (16, 56, 56)
    vc = vae.config  # BFL ae_params: ch 128, ch_mult (1, 2, 4, 4), num_res_blocks 2, z_channels 16
    assert tuple(vc.block_out_channels) == (128, 256, 512, 512) and vc.layers_per_block == 2
    assert (vc.latent_channels, vc.scaling_factor, vc.shift_factor, vc.norm_num_groups) == (
        16,
        0.3611,
        0.1159,
        32,
    )
    assert not vc.use_quant_conv and not vc.use_post_quant_conv
    cc = clip.config  # openai/clip-vit-large-patch14, text side
    assert (cc.hidden_size, cc.num_hidden_layers, cc.num_attention_heads, cc.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (cc.vocab_size, cc.max_position_embeddings, cc.projection_dim, cc.hidden_act) == (
        49408,
        77,
        768,
        "quick_gelu",
    )
    t5c = t5.config  # google/t5-v1_1-xxl, encoder only
    assert (t5c.d_model, t5c.num_layers, t5c.num_heads, t5c.d_kv, t5c.d_ff) == (4096, 24, 64, 64, 10240)
    assert (t5c.vocab_size, t5c.feed_forward_proj, t5c.dense_act_fn) == (32128, "gated-gelu", "gelu_new")
    # parameter counts against the published files: T5 9.52 GB bf16, CLIP 246 MB bf16, VAE 335 MB fp32
    counts = [sum(p.numel() for p in m.parameters()) for m in (t5, clip, vae)]
    assert counts == [4_762_310_656, 123_060_480, 83_819_683]
    assert random_weights.parameter_bytes((transformer, vae, clip, t5), torch.bfloat16) == 33_741_198_278
    assert (FULL.bucket_family, FULL.max_sequence_length, FULL.synthetic) == ("1mp", 512, True)


def test_tokenizers_have_the_real_vocabulary_sizes():
    clip, t5 = build_tokenizers(clip_vocab=49408, t5_vocab=32128)
    assert len(clip) == 49408 and (clip.bos_token_id, clip.eos_token_id) == (49406, 49407)  # as in CLIP-L
    assert len(t5) == 32128 and (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = clip("add a red hat", padding="max_length", max_length=77).input_ids
    assert ids[0] == 49406 and max(ids) == 49407 and len(ids) == 77
    t5_ids = t5("add a red hat", padding="max_length", max_length=512).input_ids
    assert len(t5_ids) == 512 and max(t5_ids) < 200  # the padding entries are never produced
    small = build_tokenizers()  # tiny and small keep their own (and their weights_id)
    assert (len(small[0]), len(small[1])) == (514, 192)


# --------------------------------------------------------------------------- refusing before allocating


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor) and not o.is_meta:
                self.bytes += o.numel() * o.element_size()
        return out


def test_a_cpu_is_refused_before_anything_is_allocated():
    with (
        _Allocations() as rec,
        pytest.raises(BackendUnavailableError, match=r"33\.7 GB of weights.*CUDA GPU"),
    ):
        load_components("full", dtype=torch.bfloat16)
    assert rec.bytes < 1 << 20  # position ids and the like, never weights


def test_a_gpu_without_room_is_refused_with_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30_000_000_000, 80_000_000_000))
    need = 33_741_198_278
    with pytest.raises(BackendUnavailableError, match=r"needs 40\.2 GB free on cuda.*it has 30\.0 GB free"):
        random_weights.require_room("full", need, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79_000_000_000, 80_000_000_000))
    random_weights.require_room("full", need, torch.device("cuda"))  # an H100 has room


# --------------------------------------------------------------------------- the initialisation


def narrow(preset: ModelPreset) -> ModelPreset:
    """The full preset at full depth (19 + 38 blocks, 24 T5 layers, 12 CLIP layers, the VAE's 4 levels)
    and reduced width: one head of 128, T5 128 wide (2 heads of 64), CLIP 32, VAE 32-64 channels."""
    assert preset.text is not None and preset.vae is not None
    return dataclasses.replace(
        preset,
        transformer=dataclasses.replace(
            preset.transformer, num_attention_heads=1, joint_attention_dim=128, pooled_projection_dim=32
        ),
        text=dataclasses.replace(
            preset.text, clip_hidden=32, clip_heads=2, t5_d_model=128, t5_heads=2, t5_d_ff=320
        ),
        vae=dataclasses.replace(preset.vae, block_out_channels=(32, 32, 64, 64)),
    )


@pytest.fixture(scope="module")
def narrow_full() -> Components:
    return build_on_device(narrow(FULL), dtype=torch.bfloat16, device="cpu")


@contextmanager
def record(model: torch.nn.Module, prefixes: tuple[str, ...]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Forward hooks on every block under `prefixes`: name -> its float32 outputs."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for prefix in prefixes:
        for i, block in enumerate(model.get_submodule(prefix)):

            def hook(_m, _i, out, name=f"{prefix}.{i}"):  # type: ignore[no-untyped-def]
                outs = out if isinstance(out, tuple) else (out,)
                seen[name] = [o.float() for o in outs if isinstance(o, torch.Tensor)]

            handles.append(block.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def assert_sane(
    seen: dict[str, list[torch.Tensor]], n_blocks: int, rms_range: tuple[float, float], peak: float
) -> None:
    assert len(seen) == n_blocks
    for name, outs in seen.items():
        for x in outs:
            rms = x.pow(2).mean().sqrt().item()
            assert torch.isfinite(x).all(), name
            assert rms_range[0] < rms < rms_range[1] and x.abs().max().item() < peak, (name, rms)


@torch.inference_mode()
def run_full_depth(c: Components, width: int, height: int, text_tokens: int) -> dict[str, float]:
    """T5, CLIP, the transformer over target + context + text tokens, and the VAE, with every block's output
    checked. Measured on the narrow CPU model (bf16): transformer block RMS 0.94-1.61 (peak 7.5), T5
    1.2-5.7 (peak 20), CLIP 1.8-3.8. The bounds leave an order of magnitude either way."""
    p = c.preset
    dtype = next(c.transformer.parameters()).dtype
    dev = next(c.transformer.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(0)
    t5_ids = c.tokenizer_2(
        ["add a red hat"], padding="max_length", max_length=text_tokens, return_tensors="pt"
    )
    with record(c.text_encoder_2, ("encoder.block",)) as seen:
        txt = c.text_encoder_2(t5_ids.input_ids.to(dev))[0]
    assert_sane(seen, p.text.t5_layers, (0.25, 64.0), 1024.0)
    clip_ids = c.tokenizer(
        ["add a red hat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with record(c.text_encoder, ("encoder.layers",)) as seen:
        vec = c.text_encoder(clip_ids.to(dev)).pooler_output
    assert_sane(seen, p.text.clip_layers, (0.1, 64.0), 1024.0)
    n = (width // 16) * (height // 16)
    img = torch.randn(1, 2 * n, 64, generator=gen, device=dev, dtype=dtype)  # [1, N + M, 64] target + context
    ids = torch.cat([image_ids(height, width, 0, dev), image_ids(height, width, 1, dev)])
    blocks = ("transformer_blocks", "single_transformer_blocks")
    with record(c.transformer, blocks) as seen:
        out = c.transformer(
            hidden_states=img,
            encoder_hidden_states=txt.to(dtype),
            pooled_projections=vec.to(dtype),
            timestep=torch.full((1,), 0.5, device=dev, dtype=dtype),
            img_ids=ids,
            txt_ids=torch.zeros(text_tokens, 3, device=dev),
            guidance=torch.full((1,), 2.5, device=dev, dtype=dtype),
            return_dict=False,
        )[0]
    assert_sane(seen, p.transformer.num_layers + p.transformer.num_single_layers, (0.25, 16.0), 256.0)
    pixels = torch.rand(1, 3, height, width, generator=gen, device=dev, dtype=dtype) * 2 - 1
    latents = c.vae.encode(pixels).latent_dist.mode()
    decoded = c.vae.decode(latents).sample
    stats = {"out": out.float().std().item(), "latents": latents.float().std().item()}
    stats["decoded"] = decoded.float().std().item()
    assert all(math.isfinite(v) and 0.01 < v < 100 for v in stats.values()), stats
    return stats


@pytest.mark.slow  # 57 blocks in bf16 on a CPU
def test_bf16_activations_stay_sane_through_all_57_blocks(narrow_full):
    c = narrow_full
    assert len(c.transformer.transformer_blocks) == 19 and len(c.transformer.single_transformer_blocks) == 38
    assert {p.dtype for m in c.modules() for p in m.parameters()} == {torch.bfloat16}
    run_full_depth(c, 128, 128, 64)


def test_the_init_rule_is_what_it_says(narrow_full):
    t = narrow_full.transformer
    h = t.config.num_attention_heads * t.config.attention_head_dim
    q = t.transformer_blocks[0].attn.to_q.weight.float()
    mod = t.transformer_blocks[0].norm1.linear.weight.float()
    assert q.std().item() == pytest.approx(1 / math.sqrt(h), rel=0.05)
    assert mod.std().item() == pytest.approx(random_weights.MODULATION_GAIN / math.sqrt(h), rel=0.05)
    assert torch.equal(
        t.transformer_blocks[0].attn.norm_q.weight,
        torch.ones_like(t.transformer_blocks[0].attn.norm_q.weight),
    )
    t5q = narrow_full.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.float()
    assert t5q.std().item() == pytest.approx(1 / math.sqrt(128) / math.sqrt(64), rel=0.05)
    pos = narrow_full.text_encoder.embeddings.position_ids  # remade after meta construction
    assert torch.equal(pos, torch.arange(77).expand(1, -1))


def test_device_built_weights_are_seeded():
    tiny_scaled = dataclasses.replace(PRESETS["tiny"], init="scaled")
    before = torch.random.get_rng_state()
    a = build_on_device(tiny_scaled, dtype=torch.float32, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_on_device(tiny_scaled, dtype=torch.float32, device="cpu")
    c = build_on_device(dataclasses.replace(tiny_scaled, seed=1), dtype=torch.float32, device="cpu")
    assert a.weights_id == b.weights_id != c.weights_id
    for x, y in zip(a.modules(), b.modules(), strict=True):
        assert all(
            torch.equal(u, v) for u, v in zip(x.state_dict().values(), y.state_dict().values(), strict=True)
        )


@pytest.mark.gpu
def test_full_preset_on_the_gpu_at_1024():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    t0 = time.perf_counter()
    c = load_components("full", dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    log.warning("full preset built on %s in %.1f s", torch.cuda.get_device_name(), time.perf_counter() - t0)
    assert {(p.device.type, p.dtype) for m in c.modules() for p in m.parameters()} == {
        ("cuda", torch.bfloat16)
    }
    stats = run_full_depth(c, 1024, 1024, 512)  # 4096 target + 4096 context + 512 text tokens
    log.warning("full preset at 1024^2: %s, peak %.1f GB", stats, torch.cuda.max_memory_allocated() / 1e9)

"""The FLOP model of one transformer forward: a hand count, the 12B anchor, a cross-check on real layers."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from torch import Tensor

from engine.buckets import ShapeKey
from engine.config import KONTEXT_DEV_TRANSFORMER, TransformerConfig
from engine.flops import (
    ForwardFlops,
    attention_flops,
    linear_flops,
    linear_flops_by_name,
    mixed_peak_tflops,
    transformer_flops,
)

# D = 8, one double and one single block: small enough to count by hand.
HAND_CFG = TransformerConfig(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=4,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=12,
    axes_dims_rope=(0, 2, 2),
    in_channels=4,
)
HAND_SHAPE = ShapeKey(batch=2, target_tokens=3, context_tokens=5, text_tokens=2)  # 8 image, 10 joint tokens


def test_hand_count_small_config() -> None:
    b, d, img, txt, joint = 2, 8, 8, 2, 10
    conditioning = (
        2 * b * 256 * d
        + 2 * b * d * d  # timestep embedder 256 -> D -> D
        + 2 * b * 256 * d
        + 2 * b * d * d  # guidance embedder 256 -> D -> D
        + 2 * b * 12 * d
        + 2 * b * d * d  # pooled text projection 12 -> D -> D
    )
    x_embedder = 2 * (b * img) * 4 * d
    context_embedder = 2 * (b * txt) * 16 * d
    double = (
        2 * (2 * b * d * 6 * d)  # norm1.linear + norm1_context.linear on temb
        + 4 * (2 * b * img * d * d)  # to_q, to_k, to_v, to_out.0
        + 2 * b * img * d * 4 * d
        + 2 * b * img * 4 * d * d  # ff up, down
        + 4 * (2 * b * txt * d * d)  # add_q/k/v_proj, to_add_out
        + 2 * b * txt * d * 4 * d
        + 2 * b * txt * 4 * d * d  # ff_context up, down
    )
    single = (
        2 * b * d * 3 * d  # norm.linear on temb
        + 3 * (2 * b * joint * d * d)  # to_q, to_k, to_v
        + 2 * b * joint * d * 4 * d  # proj_mlp
        + 2 * b * joint * 5 * d * d  # proj_out from cat([attn, mlp])
    )
    norm_out = 2 * b * d * 2 * d
    proj_out = 2 * (b * img) * d * 4
    expected_linear = conditioning + x_embedder + context_embedder + double + single + norm_out + proj_out
    assert expected_linear == 86400  # the sum above, written out once more
    heads, head_dim = 2, 4
    expected_attention = 2 * (4 * b * heads * joint * joint * head_dim)  # 2 blocks, QK^T + PV
    assert expected_attention == 12800

    flops = transformer_flops(HAND_CFG, HAND_SHAPE)
    assert flops == ForwardFlops(linear=expected_linear, attention=expected_attention)
    assert flops.total == expected_linear + expected_attention


def test_no_guidance_embedder_drops_its_linears() -> None:
    from dataclasses import replace

    cfg = replace(HAND_CFG, guidance_embeds=False)
    b, d = 2, 8
    guidance = 2 * b * 256 * d + 2 * b * d * d
    assert linear_flops(HAND_CFG, HAND_SHAPE) - linear_flops(cfg, HAND_SHAPE) == guidance


def test_kontext_dev_1024_matches_anchor() -> None:
    # docs/testing.md ("The FLOP count"): ~112 TFLOP linear + ~53 TFLOP attention = ~165 TFLOP at
    # 4096 + 4096 + 512 tokens, counted by hand from the architecture.
    flops = transformer_flops(KONTEXT_DEV_TRANSFORMER, ShapeKey(1, 4096, 4096, 512))
    assert flops.linear / 1e12 == pytest.approx(112, rel=0.02)
    assert flops.attention / 1e12 == pytest.approx(53, rel=0.02)
    assert flops.total / 1e12 == pytest.approx(165, rel=0.02)


def test_flops_scale_with_batch() -> None:
    one = transformer_flops(KONTEXT_DEV_TRANSFORMER, ShapeKey(1, 1024, 1024, 512))
    two = transformer_flops(KONTEXT_DEV_TRANSFORMER, ShapeKey(2, 1024, 1024, 512))
    assert two.linear == 2 * one.linear
    assert two.attention == 2 * one.attention


# A tiny real model: distinct sizes everywhere so a wrong stream or a wrong width shows.
CHECK_CFG = TransformerConfig(
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    axes_dims_rope=(2, 2, 4),
    in_channels=8,
)
CHECK_SHAPE = ShapeKey(batch=2, target_tokens=6, context_tokens=4, text_tokens=3)


def _tiny_model() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return cast(torch.nn.Module, FluxTransformer2DModel(**CHECK_CFG.to_diffusers())).eval()


def _rows_of(name: str, shape: ShapeKey) -> int:
    """Rows that the nn.Linear called `name` multiplies: which stream it acts on."""
    b = shape.batch
    if name.startswith("time_text_embed") or ".norm" in name or name.startswith("norm_out"):
        return b  # conditioning and modulation act on temb [B, D]
    if name.startswith("single_transformer_blocks."):
        return b * shape.total_tokens
    text_stream = (".attn.add_", ".attn.to_add_out", ".ff_context.")
    if name == "context_embedder" or any(part in name for part in text_stream):
        return b * shape.text_tokens
    if name in ("x_embedder", "proj_out") or name.startswith("transformer_blocks."):
        return b * shape.image_tokens
    raise AssertionError(f"unclassified linear {name}")


def test_linear_flops_equal_two_rows_times_weight_params() -> None:
    model = _tiny_model()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    by_params = sum(2 * _rows_of(n, CHECK_SHAPE) * m.weight.numel() for n, m in linears.items())
    assert by_params == linear_flops(CHECK_CFG, CHECK_SHAPE)


def test_linear_and_attention_flops_match_a_real_forward() -> None:
    model = _tiny_model()
    shape = CHECK_SHAPE
    counted = {"linear": 0, "attention": 0}

    def on_linear(mod: torch.nn.Linear, args: tuple[Tensor, ...], _out: Tensor) -> None:
        x = args[0]  # x: [..., in_features]
        counted["linear"] += 2 * (x.numel() // mod.in_features) * mod.in_features * mod.out_features

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(on_linear)

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(query: Tensor, key: Tensor, value: Tensor, **kw: Any) -> Tensor:
        # query: [B, H, S_q, hd]; key, value: [B, H, S_k, hd]
        bq, h, s_q, hd = query.shape
        s_k = key.shape[-2]
        counted["attention"] += 2 * bq * h * s_q * s_k * hd + 2 * bq * h * s_q * s_k * value.shape[-1]
        return sdpa(query, key, value, **kw)

    b, n_img, n_txt = shape.batch, shape.image_tokens, shape.text_tokens
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(b, n_img, CHECK_CFG.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(b, n_txt, CHECK_CFG.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(b, CHECK_CFG.pooled_projection_dim, generator=g),
        "timestep": torch.full((b,), 0.5),
        "img_ids": torch.zeros(n_img, 3),
        "txt_ids": torch.zeros(n_txt, 3),
        "guidance": torch.full((b,), 3.5),
    }
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
        out = model(**inputs, return_dict=False)[0]
    assert out.shape == (b, n_img, CHECK_CFG.in_channels)
    assert counted["linear"] == linear_flops(CHECK_CFG, shape)
    # diffusers' native attention backend calls F.scaled_dot_product_attention by keyword, once per block
    assert counted["attention"] == attention_flops(CHECK_CFG, shape)


def test_linear_flops_by_name_sum_to_the_model_and_match_each_layer_run() -> None:
    """Per-Linear FLOPs (what %peak's FP8 mix divides): each equals what that layer multiplies in a
    real forward, and together they are linear_flops."""
    model = _tiny_model()
    shape = CHECK_SHAPE
    by_name = linear_flops_by_name(model, shape)
    assert sum(by_name.values()) == linear_flops(CHECK_CFG, shape)
    ran: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(
                lambda mod, args, _out, name=name: ran.__setitem__(
                    name, 2 * (args[0].numel() // mod.in_features) * mod.in_features * mod.out_features
                )
            )
    b, n_img, n_txt = shape.batch, shape.image_tokens, shape.text_tokens
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(
            hidden_states=torch.randn(b, n_img, CHECK_CFG.in_channels, generator=g),
            encoder_hidden_states=torch.randn(b, n_txt, CHECK_CFG.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(b, CHECK_CFG.pooled_projection_dim, generator=g),
            timestep=torch.full((b,), 0.5),
            img_ids=torch.zeros(n_img, 3),
            txt_ids=torch.zeros(n_txt, 3),
            guidance=torch.full((b,), 2.5),
        )
    assert ran == by_name


def test_mixed_peak_is_the_time_weighted_mix() -> None:
    # H100: bf16 989, fp8 1979 TFLOP/s. Half the FLOPs in FP8: 1 / (0.5/1979 + 0.5/989).
    assert mixed_peak_tflops(989.0, 1979.0, 50, 100) == pytest.approx(100 / (50 / 1979 + 50 / 989))
    assert mixed_peak_tflops(989.0, 1979.0, 100, 100) == pytest.approx(1979.0)  # all FP8: the FP8 peak
    assert mixed_peak_tflops(989.0, None, 0, 100) == 989.0  # nothing in FP8: bf16's, FP8 unknown or not
    assert (
        mixed_peak_tflops(989.0, None, 10, 100) is None and mixed_peak_tflops(None, 1979.0, 10, 100) is None
    )

"""The synthetic presets' weights: tiny and small drawn on the CPU from a seeded generator by each
module's own initialisation (the same bytes on every run and machine); full built on the meta device
and filled on its device by random_weights.scaled_init_."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch

from ..config import ModelPreset
from ..errors import WeightsError
from .components import CLIP_MAX_LENGTH, Components, assemble, fingerprint_module
from .random_weights import materialize_, parameter_bytes, require_room, scaled_init_
from .tokenizers import build_tokenizers

log = logging.getLogger(__name__)


def build_synthetic(preset: ModelPreset) -> Components:
    """All components of a "module"-init preset on the CPU in fp32, weights drawn from `preset.seed`.

    Deterministic, and the global RNG is left untouched.
    """
    if preset.init != "module":
        raise WeightsError(f"preset {preset.name!r} is built on its device: use load_components")
    tokenizer, tokenizer_2 = _preset_tokenizers(preset)
    with torch.random.fork_rng(devices=[]):
        modules = build_modules(preset, tokenizer, tokenizer_2, seed=preset.seed)
    for m in modules:
        m.eval().requires_grad_(False)
    return assemble(preset, modules, tokenizer, tokenizer_2, fingerprint_module(modules[0]))


def build_on_device(
    preset: ModelPreset, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda"
) -> Components:
    """All components of a synthetic preset built on the meta device, then materialized on `device` in
    `dtype` and filled there by random_weights.scaled_init_ (component i from seed + i). Nothing passes
    through host memory. Refuses, before allocating, a device that cannot hold it."""
    dev = torch.device(device)
    tokenizer, tokenizer_2 = _preset_tokenizers(preset)
    with torch.device("meta"):
        modules = build_modules(preset, tokenizer, tokenizer_2, seed=None)
    require_room(preset.name, parameter_bytes(modules, dtype), dev)
    for i, m in enumerate(modules):
        generator = torch.Generator(device=dev).manual_seed(preset.seed + i)
        scaled_init_(materialize_(m, dev, dtype), generator)
        m.eval().requires_grad_(False)
    log.info("built preset %s on %s in %s", preset.name, dev, dtype)
    return assemble(preset, modules, tokenizer, tokenizer_2, fingerprint_module(modules[0], sample=1024))


def _preset_tokenizers(preset: ModelPreset) -> tuple[Any, Any]:
    if preset.text is None:
        raise WeightsError(f"preset {preset.name!r} has no synthetic configuration; load it from a path")
    return build_tokenizers(clip_vocab=preset.text.clip_vocab, t5_vocab=preset.text.t5_vocab)


def build_modules(
    preset: ModelPreset, tokenizer: Any, tokenizer_2: Any, seed: int | None
) -> tuple[torch.nn.Module, ...]:
    """Transformer, VAE, CLIP and T5 of `preset`. seed: reseed the global RNG before each (seed + i);
    None (meta construction) leaves it alone."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if preset.vae is None or preset.text is None:
        raise WeightsError(f"preset {preset.name!r} has no synthetic configuration; load it from a path")
    tc, vc, t = preset.text, preset.vae, preset.transformer
    if tc.clip_hidden != t.pooled_projection_dim:
        raise WeightsError(f"preset {preset.name!r}: CLIP hidden size must equal pooled_projection_dim")
    if tc.t5_d_model != t.joint_attention_dim:
        raise WeightsError(f"preset {preset.name!r}: T5 d_model must equal joint_attention_dim")

    def seeded(i: int) -> None:
        if seed is not None:
            torch.manual_seed(seed + i)

    seeded(0)
    transformer = FluxTransformer2DModel(**t.to_diffusers())
    seeded(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vc.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vc.block_out_channels),
        block_out_channels=vc.block_out_channels,
        layers_per_block=vc.layers_per_block,
        norm_num_groups=vc.norm_num_groups,
        latent_channels=vc.latent_channels,
        scaling_factor=vc.scaling_factor,
        shift_factor=vc.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    seeded(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tc.clip_vocab or len(tokenizer),
            hidden_size=tc.clip_hidden,
            intermediate_size=tc.clip_hidden * 4,
            num_hidden_layers=tc.clip_layers,
            num_attention_heads=tc.clip_heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=t.pooled_projection_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    seeded(3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=tc.t5_vocab or len(tokenizer_2),
            d_model=tc.t5_d_model,
            d_kv=tc.t5_d_model // tc.t5_heads,
            d_ff=tc.t5_d_ff,
            num_layers=tc.t5_layers,
            num_heads=tc.t5_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    return cast(tuple[torch.nn.Module, ...], (transformer, vae, text_encoder, text_encoder_2))

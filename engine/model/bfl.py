"""BFL's single-file Flux transformer (flux1-kontext-dev.safetensors): its key names <-> diffusers', the
file written, and its TransformerConfig read from the tensor shapes (the file carries no config).

BFL's key names are those of black-forest-labs/flux (src/flux/model.py, modules/layers.py); the
mapping is the one diffusers' `convert_flux_transformer_checkpoint_to_diffusers` applies, at any width.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import KONTEXT_DEV_TRANSFORMER, TransformerConfig
from ..errors import WeightsError
from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

BFL_FILE = "flux1-kontext-dev.safetensors"  # BFL's name for the Kontext transformer
_BFL_PREFIX = "model.diffusion_model."  # ComfyUI-style files prefix BFL's keys with this


# --------------------------------------------------------------------------- BFL <-> diffusers keys


@dataclass(frozen=True)
class _Rule:
    """One BFL tensor and the diffusers tensors it holds, concatenated along dim 0 in this order."""

    bfl: str
    parts: tuple[str, ...]
    split: str = "equal"  # "equal" parts, "qkv_mlp" (3 x hidden, then the MLP), "swap" (two halves reversed)


def _linear(bfl: str, *parts: str, split: str = "equal") -> list[_Rule]:
    return [_Rule(f"{bfl}.{s}", tuple(f"{p}.{s}" for p in parts), split) for s in ("weight", "bias")]


def _rules(num_double: int, num_single: int, guidance: bool) -> list[_Rule]:
    """Every tensor of a Flux transformer, BFL name -> diffusers names."""
    te = "time_text_embed"
    rules = [
        *_linear("img_in", "x_embedder"),
        *_linear("txt_in", "context_embedder"),
        *_linear("time_in.in_layer", f"{te}.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", f"{te}.timestep_embedder.linear_2"),
        *_linear("vector_in.in_layer", f"{te}.text_embedder.linear_1"),
        *_linear("vector_in.out_layer", f"{te}.text_embedder.linear_2"),
        *_linear("final_layer.linear", "proj_out"),
        # BFL's final modulation emits (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift).
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", split="swap"),
    ]
    if guidance:
        rules += _linear("guidance_in.in_layer", f"{te}.guidance_embedder.linear_1")
        rules += _linear("guidance_in.out_layer", f"{te}.guidance_embedder.linear_2")
    for i in range(num_double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rules += [
            *_linear(f"{b}.img_mod.lin", f"{d}.norm1.linear"),
            *_linear(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear"),
            *_linear(f"{b}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"),
            *_linear(
                f"{b}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"
            ),
            *_linear(f"{b}.img_attn.proj", f"{d}.attn.to_out.0"),
            *_linear(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out"),
            *_linear(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj"),
            *_linear(f"{b}.img_mlp.2", f"{d}.ff.net.2"),
            *_linear(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
            *_linear(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2"),
            _Rule(f"{b}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            _Rule(f"{b}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
            _Rule(f"{b}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",)),
            _Rule(f"{b}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",)),
        ]
    for i in range(num_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv_mlp = (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        rules += [
            *_linear(f"{b}.modulation.lin", f"{d}.norm.linear"),
            *_linear(f"{b}.linear1", *qkv_mlp, split="qkv_mlp"),
            *_linear(f"{b}.linear2", f"{d}.proj_out"),
            _Rule(f"{b}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            _Rule(f"{b}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        ]
    return rules


def _count(keys: Iterator[str] | list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> BFL's (fused qkv, fused single-block linear1).

    Works on meta tensors (the layout check of the full preset). Every key must be used exactly once.
    """
    keys = list(state_dict)
    rules = _rules(
        _count(keys, r"transformer_blocks\.(\d+)\."),
        _count(keys, r"single_transformer_blocks\.(\d+)\."),
        any(k.startswith("time_text_embed.guidance_embedder.") for k in keys),
    )
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        parts = [state_dict[p] for p in r.parts]
        if r.split == "swap":
            scale, shift = parts[0].chunk(2, dim=0)
            parts = [shift, scale]
        out[r.bfl] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    _check_all_used(keys, (p for r in rules for p in r.parts), "diffusers")
    return out


def from_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's transformer state dict (keys optionally prefixed `model.diffusion_model.`) -> diffusers'.

    Sizes come from the tensors (hidden = img_in's rows), so any width converts, unlike diffusers'
    converter, which fixes the single blocks' split at 3072. Fused tensors are popped as they are split.
    """
    sd = {k.removeprefix(_BFL_PREFIX): v for k, v in state_dict.items()}
    keys = list(sd)
    if "img_in.weight" not in sd:
        raise WeightsError("not a BFL Flux transformer checkpoint (no img_in.weight)")
    hidden = sd["img_in.weight"].shape[0]
    rules = _rules(
        _count(keys, r"double_blocks\.(\d+)\."),
        _count(keys, r"single_blocks\.(\d+)\."),
        any(k.startswith("guidance_in.") for k in keys),
    )
    _check_all_used(keys, (r.bfl for r in rules), "BFL")
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        t = sd.pop(r.bfl)
        pieces: tuple[torch.Tensor, ...]
        if r.split == "swap":
            shift, scale = t.chunk(2, dim=0)
            pieces = (torch.cat([scale, shift], dim=0),)
        elif r.split == "qkv_mlp":
            pieces = t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0)
        else:
            pieces = t.chunk(len(r.parts), dim=0)
        for name, piece in zip(r.parts, pieces, strict=True):
            out[name] = piece.clone() if len(pieces) > 1 else piece  # no views into a fused tensor
    return out


def _check_all_used(keys: list[str], used: Iterator[str], layout: str) -> None:
    left = sorted(set(keys) - set(used))
    if left:
        raise WeightsError(f"{len(left)} {layout} keys have no counterpart, e.g. {left[:3]}")


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> TransformerConfig:
    """The TransformerConfig of a BFL file from its tensor shapes (safetensors header, nothing loaded).

    Every size is in the shapes except the rotary split of a head, which no tensor holds: heads of 128
    take the real model's (16, 56, 56) (diffusers' default too); other head sizes need the folder's
    transformer/config.json.
    """
    s = {k.removeprefix(_BFL_PREFIX): v for k, v in shapes.items()}
    if "img_in.weight" not in s:
        raise WeightsError("not a BFL Flux transformer checkpoint (no img_in.weight)")
    hidden, in_channels = s["img_in.weight"]
    norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    if norm not in s:
        norm = "single_blocks.0.norm.query_norm.scale"
    head_dim = s[norm][0]  # [head_dim]
    if head_dim != sum(KONTEXT_DEV_TRANSFORMER.axes_dims_rope):
        raise WeightsError(
            f"a BFL transformer with {head_dim}-wide heads: its rotary axes are in no tensor; "
            "put the diffusers transformer/config.json beside it"
        )
    keys = list(s)
    return TransformerConfig(
        num_layers=_count(keys, r"double_blocks\.(\d+)\."),
        num_single_layers=_count(keys, r"single_blocks\.(\d+)\."),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=s["txt_in.weight"][1],
        pooled_projection_dim=s["vector_in.in_layer.weight"][1],
        axes_dims_rope=KONTEXT_DEV_TRANSFORMER.axes_dims_rope,
        in_channels=in_channels,
        guidance_embeds="guidance_in.in_layer.weight" in s,
    )


def save_bfl(transformer: torch.nn.Module, path: Path) -> Path:
    """Write a diffusers Flux transformer as BFL's single safetensors file (BFL's names, fused qkv).

    safetensors serializes the whole file in host memory before it is written (24 GB for 12B in bf16).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in to_bfl(transformer.state_dict()).items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    log.info("wrote %s (BFL layout, %d tensors)", path, len(tensors))
    return Path(path)

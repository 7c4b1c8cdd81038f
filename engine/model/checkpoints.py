"""Checkpoints on disk: Components written as a diffusers folder, a transformer as BFL's single file
(fused qkv), and both read back (`load_local`, what `--model PATH` runs), straight onto the device.

BFL's key names are those of black-forest-labs/flux (src/flux/model.py, modules/layers.py); the
mapping is the one diffusers' `convert_flux_transformer_checkpoint_to_diffusers` applies, at any width.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .config import PRESETS, ConfigError, ModelPreset, TransformerConfig
from .errors import WeightsError
from .files import atomic_write_bytes, move_into_place
from .weights import DOWNLOAD_HINT, HF_REPO, Components, assemble, fingerprint_files

log = logging.getLogger(__name__)

BFL_FILE = "flux1-kontext-dev.safetensors"  # BFL's name for the Kontext transformer
SIDECAR = "kontext.json"  # what a folder's transformer config cannot say: bucket family, T5 length
_BFL_PREFIX = "model.diffusion_model."  # ComfyUI-style files prefix BFL's keys with this


@dataclass(frozen=True)
class Sidecar:
    """kontext.json beside model_index.json, written by save_diffusers for presets other than the real one."""

    preset: str
    bucket_family: str
    max_sequence_length: int
    default_steps: int


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


# --------------------------------------------------------------------------- writing


def save_diffusers(components: Components, folder: Path) -> Path:
    """Write `components` as a diffusers FluxKontextPipeline folder (safetensors), plus kontext.json
    for a configuration other than the real model's. Files land through files.move_into_place, each
    subfolder complete before model_index.json (the file a loader opens first) appears."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp_name:
        tmp = Path(tmp_name)
        components.diffusers_pipeline().save_pretrained(tmp, safe_serialization=True)
        p = components.preset
        if p.transformer != PRESETS["kontext-dev"].transformer:
            sidecar = Sidecar(p.name, p.bucket_family, p.max_sequence_length, p.default_steps)
            (tmp / SIDECAR).write_text(json.dumps(asdict(sidecar), indent=2) + "\n")
        for sub in sorted(d for d in tmp.iterdir() if d.is_dir()):
            move_into_place(sub, folder / sub.name)
            sub.rmdir()
        move_into_place(tmp, folder, last="model_index.json")
    log.info("wrote %s (diffusers layout)", folder)
    return folder


def save_bfl(transformer: torch.nn.Module, path: Path) -> Path:
    """Write a diffusers Flux transformer as BFL's single safetensors file (BFL's names, fused qkv).

    safetensors serializes the whole file in host memory before it is written (24 GB for 12B in bf16).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in to_bfl(transformer.state_dict()).items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    log.info("wrote %s (BFL layout, %d tensors)", path, len(tensors))
    return Path(path)


# --------------------------------------------------------------------------- reading


def load_local(path: Path, *, dtype: torch.dtype, device: torch.device) -> Components:
    """A diffusers folder, or a BFL single file inside one, -> Components on `device`.

    The transformer is built on the meta device and its tensors are read by safetensors straight onto
    `device`, cast there, and assigned: no copy in host memory, none in fp32. The VAE and the text
    encoders come from the folder through diffusers' and transformers' own loaders.
    """
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(
                f"{path}: only .safetensors checkpoints are loaded (never pickle). {DOWNLOAD_HINT}"
            )
        folder = path.parent
        if not (folder / "model_index.json").exists():
            raise WeightsError(
                f"{path} holds only the transformer; put it inside the diffusers folder of {HF_REPO} "
                f"(which provides the VAE and text encoders). {DOWNLOAD_HINT}"
            )
        files = [path]
    else:
        folder = path
        if not (folder / "model_index.json").exists():
            raise WeightsError(
                f"{folder} is not a diffusers model folder (no model_index.json). {DOWNLOAD_HINT}"
            )
        files = sorted((folder / "transformer").glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder}/transformer has no .safetensors files. {DOWNLOAD_HINT}")
    preset = local_preset(folder)
    state_dict = _read(files, device)
    if path.is_file():
        state_dict = from_bfl(state_dict)
    transformer = build_transformer(preset.transformer, state_dict, dtype)
    vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2 = _load_others(folder, dtype, device)
    modules = (transformer, vae, text_encoder, text_encoder_2)
    return assemble(preset, modules, tokenizer, tokenizer_2, fingerprint_files(files), str(path.resolve()))


def local_preset(folder: Path) -> ModelPreset:
    """The preset of a diffusers folder: its transformer config, and the family and T5 length from
    kontext.json if present, else the real model's (1 MP, 512 tokens; kontext-dev itself when the
    config is the real one)."""
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        transformer = TransformerConfig.from_diffusers(config)
    except (OSError, ValueError, ConfigError) as e:
        raise WeightsError(f"{folder}/transformer/config.json: {e}. {DOWNLOAD_HINT}") from e
    real = PRESETS["kontext-dev"]
    sidecar_path = folder / SIDECAR
    if sidecar_path.exists():
        try:
            s = Sidecar(**json.loads(sidecar_path.read_text()))
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{sidecar_path} is not a valid {SIDECAR}: {e}") from e
        return ModelPreset(
            s.preset, transformer, s.bucket_family, s.max_sequence_length, default_steps=s.default_steps
        )
    if transformer == real.transformer:
        return real
    log.warning(
        "%s: a non-standard transformer config and no %s; using 1mp buckets, 512 tokens", folder, SIDECAR
    )
    return ModelPreset(folder.name, transformer, real.bucket_family, real.max_sequence_length)


def build_transformer(
    config: TransformerConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> Any:
    """A FluxTransformer2DModel built on meta and given `state_dict`'s tensors (cast to `dtype` where
    they lie), in eval mode without gradients."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = cast(torch.nn.Module, FluxTransformer2DModel(**config.to_diffusers()))
    for k in list(state_dict):
        state_dict[k] = state_dict[k].to(dtype)  # one tensor at a time, on its device
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"the checkpoint does not match its transformer config: {e}") from e
    return model.eval().requires_grad_(False)


def _read(files: list[Path], device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(f, device=str(device)))
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
            raise WeightsError(f"{f} is not a readable safetensors file: {e}") from e
    return out


def _load_others(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Any, Any, Any]:
    """VAE, CLIP, its tokenizer, T5, its tokenizer of a diffusers folder, through the libraries' loaders."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    common: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    # transformers reads straight onto the device (device_map needs no accelerate there); diffusers'
    # device_map would, so the 84M-parameter VAE passes through host memory, in `dtype`.
    on_device: dict[str, Any] = {"dtype": dtype, "device_map": str(device), **common}
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **common)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **on_device)
        text_encoder_2 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", **on_device)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        tokenizer_2 = T5Tokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not load {folder}: {e}. {DOWNLOAD_HINT}") from e
    vae.to(device)
    for m in (vae, text_encoder, text_encoder_2):
        m.eval().requires_grad_(False)
    return vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2

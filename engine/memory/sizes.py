"""What each component weighs, counted on the meta device (no weights read, no memory allocated):
parameter bytes at the precision each component would run in, and the transformer's blocks one by one
(the unit block streaming moves).

Byte rules: floating parameters at the component's dtype; FP8 storage (fp8_storage.py) keeps every
Linear that backends.fp8.fp8_filter selects as one float8_e4m3fn byte per weight plus one float32
scale, with its bias and every other parameter in bf16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backends.fp8 import fp8_filter
from ..config import PRESETS, ModelPreset
from ..errors import ConfigError

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")  # diffusers' names
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # the streamed units, in run order
FP8_SCALE_BYTES = 4  # one float32 scale per FP8 weight


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each component (by diffusers' name) at bf16, and the transformer's FP8-storage bytes.

    blocks_bf16 / blocks_fp8: bytes of each transformer block in run order (19 double, then 38 single on
    the real model); the rest of the transformer (embedders, output head) is its `*_fixed` bytes.
    """

    preset: ModelPreset
    bf16: dict[str, int]
    transformer_fp8: int
    blocks_bf16: tuple[int, ...]
    blocks_fp8: tuple[int, ...]
    t5: tuple[int, int, int, int]  # (d_model, d_ff, heads, tokens): the text phase's activation terms
    vae_channels: tuple[int, ...]  # block_out_channels

    @property
    def transformer_fixed_bf16(self) -> int:
        return self.bf16["transformer"] - sum(self.blocks_bf16)

    @property
    def transformer_fixed_fp8(self) -> int:
        return self.transformer_fp8 - sum(self.blocks_fp8)


def module_bytes(module: torch.nn.Module, fp8: str | None = None, prefix: str = "") -> int:
    """Parameter bytes of `module` in bf16; fp8 = an FP8 filter name ("all", "tokens"): the Linears it
    selects stored as E4M3 + a float32 scale. prefix: the module's name in the transformer (a block's
    `single_transformer_blocks.3`), so the filter sees the names it sees on the whole model."""
    total = 0
    seen: set[int] = set()
    for name, m in module.named_modules(prefix=prefix):
        quantized = fp8 is not None and fp8_filter(m, name, fp8)
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if quantized and pname == "weight":
                total += p.numel() + FP8_SCALE_BYTES
            else:
                total += p.numel() * (2 if p.is_floating_point() else p.element_size())
    return total


def meta_modules(preset: ModelPreset) -> tuple[Any, ...]:
    """(transformer, VAE, CLIP, T5) of a synthetic-shaped preset, built on the meta device."""
    from ..model.synthetic import build_modules
    from ..model.tokenizers import build_tokenizers

    if preset.text is None:
        raise ConfigError(f"preset {preset.name!r} has no encoder configuration to count")
    clip, t5 = build_tokenizers(preset.text.clip_vocab, preset.text.t5_vocab)
    with torch.device("meta"):
        return build_modules(preset, clip, t5, seed=None)


def resolve_preset(model: str | Path) -> ModelPreset:
    """A preset name, or a diffusers folder of Kontext: its transformer config (and family, T5 length),
    with the real model's encoders and VAE (FLUX.1 Kontext [dev] ships one set: the `full` preset's)."""
    name = str(model)
    if name in PRESETS:
        preset = PRESETS[name]
    else:
        from ..model.checkpoints import local_preset

        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")
        preset = local_preset(folder)
    if preset.text is None or preset.vae is None:
        full = PRESETS["full"]
        preset = dataclasses.replace(preset, text=full.text, vae=full.vae)
    return preset


def model_sizes(model: str | Path | ModelPreset, fp8: str = "all") -> ModelSizes:
    """Count every component of `model` on the meta device (a second for the 17B real model)."""
    preset = model if isinstance(model, ModelPreset) else resolve_preset(model)
    transformer, vae, clip, t5 = meta_modules(preset)
    blocks = [(f"{name}.{i}", b) for name in BLOCK_LISTS for i, b in enumerate(getattr(transformer, name))]
    tc, vc = preset.text, preset.vae
    if tc is None or vc is None:
        raise ConfigError(f"preset {preset.name!r} has no encoder configuration to count")
    return ModelSizes(
        preset=preset,
        bf16={
            "transformer": module_bytes(transformer),
            "text_encoder": module_bytes(clip),
            "text_encoder_2": module_bytes(t5),
            "vae": module_bytes(vae),
        },
        transformer_fp8=module_bytes(transformer, fp8),
        blocks_bf16=tuple(module_bytes(b) for _, b in blocks),
        blocks_fp8=tuple(module_bytes(b, fp8, name) for name, b in blocks),
        t5=(tc.t5_d_model, tc.t5_d_ff, tc.t5_heads, preset.max_sequence_length),
        vae_channels=tuple(vc.block_out_channels),
    )

"""The VAE encoding and decoding in overlapping tiles (diffusers' AutoencoderKL tiling, configured here):
the full-resolution activations of one VAE_TILE^2 tile instead of the whole image. Tiles are blended
over VAE_OVERLAP of their side; GroupNorm statistics and the mid-block attention then see one tile, not
the image, so the result differs from untiled by a bound tests/test_memory_mechanisms.py states."""

from __future__ import annotations

from typing import Any

from ..buckets import family_scale
from ..errors import ConfigError
from .activations import VAE_OVERLAP, VAE_TILE


def tile_vae(vae: Any, tile: int = VAE_TILE, overlap: float = VAE_OVERLAP) -> Any:
    """Turn tiling on for `vae` (in place): tiles of `tile` pixels (tile / 8 latents), `overlap` blended."""
    if not hasattr(vae, "enable_tiling"):
        raise ConfigError(f"{type(vae).__name__} cannot tile; a diffusers AutoencoderKL can")
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if tile % (down * 2) or not 0 < overlap < 0.5:
        raise ConfigError(f"VAE tiles must be a multiple of {down * 2} pixels and overlap in (0, 0.5)")
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // down
    vae.tile_overlap_factor = overlap
    return vae


def tile_for(family: str) -> int:
    """VAE_TILE scaled with the family (512 pixels at 1mp, 64 on tiny), a multiple of 16."""
    return max(16, round(VAE_TILE * family_scale(family) / 16) * 16)


def is_tiled(vae: Any) -> bool:
    return bool(getattr(vae, "use_tiling", False))

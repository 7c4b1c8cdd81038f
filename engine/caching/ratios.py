"""MagCache's calibrated magnitude ratios (per step: mean |r_t| / |r_t-1| of the block stack's residual),
and the nearest-neighbour interpolation to another step count that diffusers and MagCache both use.

Checkpoint-dependent numbers measured on the real models by their authors, not by us: they are a
schedule, so they decide the same steps on any weights (random ones included).
"""

from __future__ import annotations

import torch

# MagCache4FLUX_Kontext/magcache_flux_kontext.py (Zehong-Ma/MagCache): FLUX.1 Kontext [dev], 28 steps.
KONTEXT_RATIOS: tuple[float, ...] = (
    1.0, 1.19531, 1.07812, 1.02344, 1.03125, 1.00781, 1.02344, 1.01562, 1.01562, 1.0, 1.01562, 1.0, 1.00781,
    1.0, 1.00781, 1.0, 1.00781, 0.99609, 1.01562, 0.99219, 1.0, 0.99219, 0.98438, 0.99609, 0.96484, 0.96094,
    0.9375, 0.93359,
)  # fmt: skip

# diffusers 0.42.1 hooks/mag_cache.py FLUX_MAG_RATIOS (from MagCache4FLUX): FLUX.1 [dev], 28 steps.
FLUX_RATIOS: tuple[float, ...] = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047,
    1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484,
    0.95703, 0.93359, 0.89062,
)  # fmt: skip

RATIOS: dict[str, tuple[float, ...]] = {"kontext": KONTEXT_RATIOS, "flux": FLUX_RATIOS}


# Mirrors diffusers hooks/mag_cache.py::nearest_interp (v0.42)
def nearest_interp(ratios: torch.Tensor, steps: int) -> torch.Tensor:
    """[K] ratios -> [steps]: index round(i * (K - 1) / (steps - 1)); one step takes the last ratio."""
    if steps == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (steps - 1)
    grid = torch.arange(steps, dtype=torch.float32)
    return ratios[torch.round(grid * scale).long()]


def ratios_for(name: str, steps: int) -> torch.Tensor:
    """The named ratio set as diffusers' MagCacheConfig holds it for `steps` steps: float32, interpolated
    when the count differs."""
    ratios = torch.tensor(RATIOS[name])  # float32, as torch.tensor(list) makes it
    return ratios if len(ratios) == steps else nearest_interp(ratios, steps)

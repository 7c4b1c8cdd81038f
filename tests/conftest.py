"""Shared fixtures: the tiny preset is built once per session (seeded random weights)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.weights import Components, load_components


@pytest.fixture(scope="session")
def tiny() -> Components:
    return load_components("tiny")


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: smooth gradients plus seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-20, 20, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")

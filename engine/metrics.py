"""Quality metrics shared by the build's verification, the tests and the benchmark: PSNR and relative L2."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

ArrayLike = Image.Image | np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"), dtype=np.float64)
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(image: ArrayLike, reference: ArrayLike, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(range^2 / MSE). inf when identical.

    PIL images are compared as RGB uint8 values (range 255); arrays and tensors as given.
    """
    a, r = _as_float64(image), _as_float64(reference)
    if a.shape != r.shape:
        raise ConfigError(f"psnr needs equal shapes, got {a.shape} and {r.shape}")
    if data_range <= 0:
        raise ConfigError(f"data_range must be positive, got {data_range}")
    mse = float(np.mean((a - r) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def rel_l2(output: ArrayLike, reference: ArrayLike) -> float:
    """||output - reference||_2 / ||reference||_2 over all elements (float64). 0 when identical.

    A zero reference gives 0 if the output is zero too, inf otherwise.
    """
    a, r = _as_float64(output), _as_float64(reference)
    if a.shape != r.shape:
        raise ConfigError(f"rel_l2 needs equal shapes, got {a.shape} and {r.shape}")
    diff = float(np.linalg.norm((a - r).ravel()))
    ref = float(np.linalg.norm(r.ravel()))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref

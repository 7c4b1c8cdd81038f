"""PSNR and relative L2 on inputs whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ConfigError
from engine.metrics import psnr, rel_l2


def test_psnr_identical_is_inf():
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    assert psnr(img, img.copy()) == math.inf


def test_psnr_known_mse():
    # Every value off by 5: MSE = 25, PSNR = 10 log10(255^2 / 25) = 20 log10(51) = 34.1514 dB.
    a = np.full((4, 4, 3), 100, dtype=np.uint8)
    b = a + 5
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(20 * math.log10(51), abs=1e-9)
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(34.1514, abs=1e-4)


def test_psnr_one_pixel_and_data_range():
    # One of 100 values off by 1 in [0, 1]: MSE = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    ref = np.zeros(100)
    out = ref.copy()
    out[0] = 1.0
    assert psnr(out, ref, data_range=1.0) == pytest.approx(20.0)
    assert psnr(torch.from_numpy(out), torch.from_numpy(ref), data_range=1.0) == pytest.approx(20.0)


def test_rel_l2_known_values():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert rel_l2(ref, ref) == 0.0
    assert rel_l2(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)  # |0.5| / 5
    assert rel_l2(1.01 * ref, ref) == pytest.approx(0.01)
    assert rel_l2(torch.zeros(2), ref) == pytest.approx(1.0)


def test_rel_l2_zero_reference():
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_l2(np.ones(3), np.zeros(3)) == math.inf


def test_rel_l2_bf16_inputs_are_compared_in_float64():
    ref = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert rel_l2(ref.to(torch.bfloat16), ref) == pytest.approx(0.0, abs=1e-2)


@pytest.mark.parametrize("fn", [psnr, rel_l2])
def test_shape_mismatch_is_a_typed_error(fn):
    with pytest.raises(ConfigError, match="equal shapes"):
        fn(np.zeros(3), np.zeros(4))

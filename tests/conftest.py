"""Shared fixtures: the tiny preset is built once per session (seeded random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.model.components import Components
from engine.model.load import load_components


@pytest.fixture(scope="session")
def tiny() -> Components:
    return load_components("tiny")


@pytest.fixture
def tiny_engine(tiny: Components):
    """A torch KontextEngine over the session's tiny components (what engine.load("tiny") returns,
    without rebuilding the preset)."""
    import torch

    from engine.backends.torch import TorchDenoiser
    from engine.dispatch import Dispatcher
    from engine.runtime import KontextEngine

    dispatcher = Dispatcher(TorchDenoiser(tiny.transformer, name="torch-eager-fp32"), family="tiny")
    with KontextEngine(tiny, dispatcher, device="cpu", dtype=torch.float32) as kontext:
        yield kontext


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: smooth gradients plus seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-20, 20, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------ built tiny engine (runtime tests)


@pytest.fixture(scope="session")
def tiny_build(tiny: Components, request: pytest.FixtureRequest) -> Path:
    """The tiny preset's ONNX Runtime build (fp32 + int8) by the build step, with a lighter calibration
    (4 edits x 2 steps), cached in pytest's cache folder per weights and library versions."""
    import importlib.metadata as md

    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec

    libs = "-".join(md.version(d) for d in ("torch", "onnxruntime", "nvidia-modelopt", "diffusers"))
    out = Path(request.config.cache.mkdir("kontext-tiny-build")) / f"{tiny.weights_id}-{libs}".replace(
        "+", "_"
    )
    options = BuildOptions(calibration=CalibrationSpec(edits=4, steps=2), progress=False)
    build(
        "tiny",
        out_dir=out,
        precisions=("fp32", "int8"),
        backend="onnxruntime",
        options=options,
        components=tiny,
    )  # stages skip if fresh
    return out


# ------------------------------------------------------------------ the build step's own tests
# A copy of `tiny_build` brought up to fp32 + int8 + fp8 by build() (only the fp8 stages run), in a
# tmp folder the build-step tests copy before changing anything.

BUILD_TEST_CALIBRATION = {"edits": 4, "steps": 2}  # the same as tiny_build's, so its stages are reused


@pytest.fixture(scope="session")
def built_tiny(tiny_build: Path, tiny: Components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from engine.builder.builder import BuildOptions, build
    from engine.calibration import CalibrationSpec

    out = tmp_path_factory.mktemp("built") / "tiny"
    shutil.copytree(tiny_build, out)
    options = BuildOptions(calibration=CalibrationSpec(**BUILD_TEST_CALIBRATION), progress=False)
    build(
        "tiny",
        out_dir=out,
        precisions=("fp32", "int8", "fp8"),
        family="tiny",
        backend="onnxruntime",
        options=options,
        components=tiny,
    )
    return out


def save_png(image, path, metadata):
    """A PNG with `metadata` as text chunks, written atomically: the engine's own encoder and writer."""
    from engine.images import encode_image, write_bytes

    return write_bytes(path, encode_image(image, "PNG", metadata))

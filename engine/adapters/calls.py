"""diffusers_call: the keywords that make diffusers' FluxKontextPipeline run an EditRequest as we do."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ..errors import ConfigError
from ..request import EditRequest


def diffusers_call(request: EditRequest, max_sequence_length: int) -> dict[str, Any]:
    """The keywords of `FluxKontextPipeline.__call__` that run `request` as our pipeline does: at its
    size exactly (diffusers otherwise resizes the input to about 1024² and rounds the output through
    max_area), with its steps, guidance and seed (a CPU generator, as our noise). Used by the bench's
    diffusers baseline and by the parity tests, so both call diffusers the one way."""
    if request.size is None:
        raise ConfigError("calling diffusers like our pipeline needs an explicit output size (request.size)")
    if not isinstance(request.image, Image.Image):
        raise ConfigError("diffusers takes the input as pixels, not as an EncodedImage")
    w, h = request.size
    return {
        "image": request.image,
        "prompt": request.prompt,
        "height": h,
        "width": w,
        "max_area": w * h,
        "_auto_resize": False,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
        "max_sequence_length": max_sequence_length,
    }

"""Our sampling loop against diffusers' FluxKontextPipeline: the contract that keeps the loop right.

Same components, image, prompt, seed, size and steps -> final packed latents within 1e-5 (fp32).
The mutant tests prove the check has teeth: each plausible bug in the loop breaks parity.
"""

from __future__ import annotations

import pytest
import torch

from engine import sampling
from engine.backends.torch import TorchDenoiser
from engine.config import DEFAULT_GUIDANCE
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image

PROMPT = "add a red hat to the cat"
TOL = 1e-5


def diffusers_latents(tiny, image, size, steps, seed, guidance=DEFAULT_GUIDANCE) -> torch.Tensor:
    pipe = tiny.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    w, h = size
    out = pipe(
        image=image,
        prompt=PROMPT,
        height=h,
        width=w,
        max_area=w * h,
        _auto_resize=False,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=tiny.preset.max_sequence_length,
        output_type="latent",
    )
    return out.images  # [1, N, 64] packed


def our_latents(tiny, image, size, steps, seed, guidance=DEFAULT_GUIDANCE) -> torch.Tensor:
    pipe = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    request = EditRequest(image, PROMPT, steps=steps, guidance=guidance, seed=seed, size=size)
    return pipe.edit(request, progress=False).latents


@pytest.mark.parametrize("size", [(128, 128), (80, 192)], ids=["square", "portrait"])
@pytest.mark.parametrize("steps", [2, 5])
def test_final_latents_match_diffusers(tiny, size, steps):
    image = gradient_image(*size)
    ours = our_latents(tiny, image, size, steps, seed=7)
    ref = diffusers_latents(tiny, image, size, steps, seed=7)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3g} > {TOL}"
    assert ours.abs().mean() > 0.1  # not a degenerate all-zero agreement


def _flagless_ids(height, width, index, device="cpu"):
    return _ORIG_IDS(height, width, 0, device)


def _swapped_pack(latents):
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 5, 3)  # 2x2 patch transposed
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _unshifted_schedule(steps, target_tokens, device="cpu"):
    return _ORIG_SCHEDULE(steps, 256 * 16, device)  # mu from the wrong token count


def _ctx_slice_denoise(denoiser, img, img_ids, ctx, ctx_ids, *a, **k):
    def last_tokens(**kw):
        return denoiser(**kw).flip(1)  # keeps the context tokens' velocity instead of the target's

    return _ORIG_DENOISE(last_tokens, img, img_ids, ctx, ctx_ids, *a, **k)


_ORIG_IDS, _ORIG_SCHEDULE, _ORIG_DENOISE = sampling.image_ids, sampling.get_schedule, sampling.denoise
MUTANTS = {
    "ids_flag": ("image_ids", _flagless_ids),
    "packing": ("pack", _swapped_pack),
    "schedule_shift": ("get_schedule", _unshifted_schedule),
    "slicing": ("denoise", _ctx_slice_denoise),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_parity_catches_bugs(tiny, monkeypatch, mutant):
    """Each bug the parity test must catch, planted in our loop, moves the latents far beyond 1e-5."""
    size, steps = (80, 192), 2
    image = gradient_image(*size)
    ref = diffusers_latents(tiny, image, size, steps, seed=7)
    attr, fn = MUTANTS[mutant]
    monkeypatch.setattr(sampling, attr, fn)
    ours = our_latents(tiny, image, size, steps, seed=7)
    err = (ours - ref).abs().max().item()
    assert err > 100 * TOL, f"mutant {mutant} went unnoticed (max abs diff {err:.3g})"

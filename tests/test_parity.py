"""Our sampling loop against diffusers' FluxKontextPipeline: the contract that keeps the loop right.

Same components, image, prompt, seed, size and steps -> final packed latents within 1e-5 (fp32).
The mutant tests prove the check has teeth: each plausible bug in the loop breaks parity.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import sampling
from engine.adapters import diffusers_call
from engine.backends.torch import TorchDenoiser
from engine.config import DEFAULT_GUIDANCE
from engine.images import to_tensor
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image

PROMPT = "add a red hat to the cat"
TOL = 1e-5


def diffusers_latents(tiny, image, size, steps, seed, guidance=DEFAULT_GUIDANCE) -> torch.Tensor:
    pipe = tiny.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    request = EditRequest(image, PROMPT, steps, guidance, seed, size=size)
    out = pipe(**diffusers_call(request, tiny.preset.max_sequence_length), output_type="latent")
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


# ------------------------------------------------------------------ each mirrored function, one by one

MIRRORED = ("sampling.py", "pipeline.py")  # the engine files whose `# Mirrors diffusers` markers are checked
MARKER = re.compile(r"^\s*# Mirrors diffusers (\S+)::(\S+) \(v0\.42\)", re.M)


def _markers() -> set[str]:
    root = Path(sampling.__file__).parent
    return {m.group(2) for f in MIRRORED for m in MARKER.finditer((root / f).read_text())}


def _kontext():
    from diffusers.pipelines.flux import pipeline_flux_kontext

    return pipeline_flux_kontext, pipeline_flux_kontext.FluxKontextPipeline


def _check_pack(tiny) -> None:
    x = torch.randn(2, 16, 10, 24)  # [B, C, H/8, W/8] of an 80x192 image
    assert torch.equal(sampling.pack(x), _kontext()[1]._pack_latents(x, 2, 16, 10, 24))


def _check_unpack(tiny) -> None:
    tokens = torch.randn(2, 5 * 12, 64)  # [B, N, 64] of an 80x192 image
    assert torch.equal(sampling.unpack(tokens, 80, 192), _kontext()[1]._unpack_latents(tokens, 80, 192, 8))


def _check_ids(tiny) -> None:
    theirs = _kontext()[1]._prepare_latent_image_ids(1, 80 // 16, 192 // 16, "cpu", torch.float32)
    assert torch.equal(sampling.image_ids(80, 192, index=0), theirs)


def _check_prepare_latents(tiny) -> None:
    """Noise, its ids, the context image's packed latents and its ids (index 1), all at once."""
    pipe, image = tiny.diffusers_pipeline(), gradient_image(80, 192)
    ours = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    pixels = to_tensor(image)  # [1, 3, H, W]: the same pixels both ways (diffusers' resize aside)
    generator = torch.Generator("cpu").manual_seed(7)
    with torch.inference_mode():
        noise, ctx, ids, ctx_ids = pipe.prepare_latents(
            pixels, 1, 16, 80, 192, torch.float32, "cpu", generator
        )
        our_ctx, our_ctx_ids = ours.encode_image(image)
    assert torch.equal(sampling.get_noise(1, 80, 192, 7, torch.float32), noise)
    assert torch.equal(sampling.image_ids(80, 192, index=0), ids)
    assert torch.equal(our_ctx, ctx) and torch.equal(our_ctx_ids, ctx_ids)


def _check_encoders(tiny) -> None:
    """CLIP pooled, T5 states and text ids: FluxKontextPipeline.encode_prompt and the two it calls."""
    pipe = tiny.diffusers_pipeline()
    ours = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    length = tiny.preset.max_sequence_length
    with torch.inference_mode():
        txt, vec, txt_ids = ours.encode_prompt(PROMPT)
        theirs = pipe.encode_prompt(PROMPT, None, device="cpu", max_sequence_length=length)
        clip = pipe._get_clip_prompt_embeds(PROMPT, device="cpu")
        t5 = pipe._get_t5_prompt_embeds(PROMPT, max_sequence_length=length, device="cpu")
    assert torch.equal(txt, theirs[0]) and torch.equal(vec, theirs[1]) and torch.equal(txt_ids, theirs[2])
    assert torch.equal(vec, clip) and torch.equal(txt, t5)


def _check_shift(tiny) -> None:
    module = _kontext()[0]
    config = tiny.scheduler().config  # what FluxKontextPipeline.__call__ passes calculate_shift
    args = [config.get(k) for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")]
    assert args == [256, 4096, 0.5, 1.15]  # our calculate_shift's defaults
    for n in (60, 256, 1024, 4096, 6000):
        assert sampling.calculate_shift(n) == module.calculate_shift(n, *args)


def _check_schedule(tiny) -> None:
    module = _kontext()[0]
    for steps, tokens in ((2, 60), (5, 256), (28, 4096)):
        scheduler = tiny.scheduler()
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, n = module.retrieve_timesteps(
            scheduler, steps, "cpu", sigmas=sigmas, mu=module.calculate_shift(tokens)
        )
        ours = sampling.get_schedule(steps, tokens)
        assert n == ours.steps and torch.equal(ours.timesteps, timesteps)
        assert torch.equal(ours.sigmas, scheduler.sigmas)


def _check_call(tiny) -> None:
    """The pixels out: diffusers' __call__ (output_type pil) against our edit, same everything."""
    pipe = tiny.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    request = EditRequest(gradient_image(80, 192), PROMPT, steps=2, seed=7, size=(80, 192))
    theirs = pipe(**diffusers_call(request, tiny.preset.max_sequence_length)).images[0]
    ours = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    out = ours.edit(request, progress=False).image
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(theirs, np.int16))
    assert diff.max() <= 1  # 8-bit rounding of the same floats (latents agree to 1e-5 above)


CHECKS = {
    "FluxKontextPipeline._pack_latents": _check_pack,
    "FluxKontextPipeline._unpack_latents": _check_unpack,
    "FluxKontextPipeline._prepare_latent_image_ids": _check_ids,
    "FluxKontextPipeline.prepare_latents": _check_prepare_latents,
    "FluxKontextPipeline._encode_vae_image": _check_prepare_latents,  # prepare_latents calls it
    "FluxKontextPipeline.encode_prompt": _check_encoders,
    "FluxKontextPipeline._get_clip_prompt_embeds": _check_encoders,
    "FluxKontextPipeline._get_t5_prompt_embeds": _check_encoders,
    "calculate_shift": _check_shift,
    "retrieve_timesteps": _check_schedule,
    "FluxKontextPipeline.__call__": _check_call,
}


def test_every_marker_has_a_check() -> None:
    """A `# Mirrors diffusers` marker added without a check here (or a check whose marker is gone) fails."""
    assert _markers() == set(CHECKS)


@pytest.mark.parametrize(
    "check", sorted(set(CHECKS.values()), key=lambda f: f.__name__), ids=lambda f: f.__name__
)
def test_mirrored_function_matches_diffusers(tiny, check) -> None:
    check(tiny)

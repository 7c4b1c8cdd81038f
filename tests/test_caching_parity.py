"""Our step caches against diffusers 0.42.1's own cache hooks, on the same tiny model and edit.

diffusers runs FluxKontextPipeline with the hook enabled on a copy of the transformer, inside
`transformer.cache_context(...)` (its Kontext pipeline opens none, so the hooks would fail without it).
Full passes are counted inside the last block (a forward hook on its proj_out child): a skipped block's
hook bypasses its children, but not a forward hook on the block itself. Each case asserts the same
number of full passes on both sides and final latents within 1e-4 relative L2; the negative controls
show that a wrong threshold or ratio set breaks one or the other.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

from engine.adapters import diffusers_call
from engine.backends.torch import TorchDenoiser
from engine.caching.ratios import FLUX_RATIOS, KONTEXT_RATIOS
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image

SIZE = (128, 128)
STEPS = 28  # the Kontext ratios' own step count
SEED = 3
PROMPT = "add a hat"
TOL = 1e-4  # relative L2 of the final latents


def _request(tiny, cache: str | None = None) -> EditRequest:
    return EditRequest.of(gradient_image(*SIZE), PROMPT, steps=STEPS, seed=SEED, size=SIZE, cache=cache)


def _counted(tiny) -> tuple[torch.nn.Module, list[int]]:
    """A copy of the tiny transformer and the number of times its last block really ran."""
    t = copy.deepcopy(tiny.transformer)
    runs = [0]
    last = t.single_transformer_blocks[-1].proj_out
    last.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return t, runs


def theirs(tiny, config) -> tuple[torch.Tensor, int]:
    t, runs = _counted(tiny)
    t.enable_cache(config)
    pipe = dataclasses.replace(tiny, transformer=t).diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with t.cache_context("cond"):
        out = pipe(**diffusers_call(_request(tiny), tiny.preset.max_sequence_length), output_type="latent")
    return out.images, runs[0]  # [1, N, 64]


def ours(tiny, spec: str) -> tuple[torch.Tensor, int]:
    t, runs = _counted(tiny)
    pipe = KontextPipeline(dataclasses.replace(tiny, transformer=t), TorchDenoiser(t))
    result = pipe.edit(_request(tiny, spec), progress=False)
    assert result.steps_computed == runs[0]  # what we report is what ran
    return result.latents, runs[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _mag(ratios) -> MagCacheConfig:
    return MagCacheConfig(
        threshold=0.05,
        max_skip_steps=4,
        retention_ratio=0.2,
        num_inference_steps=STEPS,
        mag_ratios=list(ratios),
    )


# On this tiny random model these thresholds give 25, 12 and 5 full passes of 28: hits and misses mixed.
@pytest.mark.parametrize("threshold", [0.2, 0.3, 0.4])
def test_first_block_cache_matches_diffusers(tiny, threshold):
    ref, ref_passes = theirs(tiny, FirstBlockCacheConfig(threshold=threshold))
    got, passes = ours(tiny, f"fbc:threshold={threshold}")
    assert passes == ref_passes
    assert 1 < passes < STEPS  # a mixed pattern, not all hits or all misses
    assert rel_l2(got, ref) <= TOL


def test_magcache_kontext_matches_diffusers(tiny):
    ref, ref_passes = theirs(tiny, _mag(KONTEXT_RATIOS))
    got, passes = ours(tiny, "magcache-kontext")
    # a schedule: 14 of 28 on any weights (docs/caching.md, 'What we measured')
    assert passes == ref_passes == 14
    assert rel_l2(got, ref) <= TOL


def test_taylorseer_matches_diffusers_lite_mode(tiny):
    """Our TaylorSeer caches the velocity: diffusers' lite mode (proj_out cached, blocks skipped)."""
    config = TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32)
    ref, ref_passes = theirs(tiny, config)
    got, passes = ours(tiny, "taylorseer")
    assert passes == ref_passes == 8  # steps 0, 1, 2, then every 5th from 4
    assert rel_l2(got, ref) <= TOL


def test_negative_controls(tiny):
    """A wrong threshold changes the pass count; the wrong ratio set (same count here) the latents."""
    _, ref_passes = theirs(tiny, FirstBlockCacheConfig(threshold=0.3))
    _, passes = ours(tiny, "fbc:threshold=0.25")
    assert passes != ref_passes
    ref, ref_passes = theirs(tiny, _mag(KONTEXT_RATIOS))
    got, passes = ours(tiny, "magcache:threshold=0.05,max_skip_steps=4,retention_ratio=0.2,ratios=flux")
    assert passes != ref_passes or rel_l2(got, ref) > 10 * TOL
    assert list(FLUX_RATIOS) != list(KONTEXT_RATIOS)

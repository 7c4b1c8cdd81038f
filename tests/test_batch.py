"""Several images per request: seeds seed, seed + 1, ...; one batch through an engine that serves it
(torch serves any), one seed at a time through one that does not; each image is the single edit of
its seed.

Tolerance of the batch (fp32, torch on CPU): a batch changes the M dimension of every matmul, and the
BLAS may block it differently, so a row is not bit-identical to the same row computed alone. Measured
on tiny and small at 4 steps (`python -m benchmarks.batch --check`): at most 4.8e-7 and 9.5e-7 max abs
on the final latents (latents of magnitude ~5), and 1 level of 255 on the decoded pixels. The bound
asserted is the parity bound, 1e-5, and 1 pixel level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import sampling
from engine.buckets import ShapeKey
from engine.cli import main
from engine.errors import ConfigError
from engine.images import read_png_metadata
from engine.runtime import load

from .conftest import gradient_image, save_png

PROMPT = "add a red hat"
LATENT_TOL = 1e-5


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_noise_of_a_batch_is_each_seeds_own_noise():
    batch = sampling.get_noise_for_seeds([7, 8, 9], 96, 160, torch.float32)
    for i, seed in enumerate((7, 8, 9)):
        assert torch.equal(batch[i : i + 1], sampling.get_noise(1, 96, 160, seed, torch.float32))
    # one generator drawing a batch continues seed 7's stream: row 1 is NOT seed 8's noise
    stream = sampling.get_noise(2, 96, 160, 7, torch.float32)
    assert not torch.equal(stream[1:2], batch[1:2])


def test_a_batch_equals_the_single_edits_of_its_seeds(tiny_engine):
    image = gradient_image(80, 192, seed=2)
    out = tiny_engine.edit(image, PROMPT, seed=40, steps=3, num_images=3)
    singles = [tiny_engine.edit(image, PROMPT, seed=40 + i, steps=3) for i in range(3)]
    assert out.seeds == [40, 41, 42] and len(out.images) == 3 and out.image is out.images[0]
    assert out.shape_key == ShapeKey(3, 60, 60, 32) and out.latents.shape == (3, 60, 64)
    for i, single in enumerate(singles):
        err = (out.latents[i] - single.latents[0]).abs().max().item()
        assert err <= LATENT_TOL, f"image {i}: max abs {err:.3g}"
        assert np.abs(_pixels(out.images[i]) - _pixels(single.image)).max() <= 1
    assert (singles[0].latents - singles[1].latents).abs().max() > 0.1  # the seeds did advance


def test_one_image_keeps_the_single_result_shape(tiny_engine):
    out = tiny_engine.edit(gradient_image(128, 128), PROMPT, seed=3, steps=1)
    assert out.images == [out.image] and out.seeds == [3] and out.shape_key.batch == 1


def test_an_engine_without_the_batch_runs_the_seeds_one_by_one(tiny_build):
    image = gradient_image(128, 128, seed=5)
    with load(tiny_build, precision="fp32") as kontext:
        assert {k.batch for k in kontext.shape_keys or ()} == {1}
        out = kontext.edit(image, PROMPT, seed=9, steps=2, num_images=2)
        singles = [kontext.edit(image, PROMPT, seed=s, steps=2) for s in (9, 10)]
        stats = kontext.stats()
    for i, single in enumerate(singles):
        assert torch.equal(out.latents[i : i + 1], single.latents)  # the same batch-1 calls: exact
        assert out.images[i].tobytes() == single.image.tobytes()
    assert out.shape_key.batch == 1 and out.seeds == [9, 10] and len(out.step_times) == 4
    assert (stats.hits, stats.misses) == (3, 0)  # sequential is not a miss


def test_num_images_out_of_range_is_refused(tiny_engine):
    with pytest.raises(ConfigError, match="num_images must be between 1 and 64"):
        tiny_engine.edit(gradient_image(128, 128), PROMPT, num_images=0)


def test_cli_num_images_and_references(tmp_path):
    ref = tmp_path / "ref.png"
    save_png(gradient_image(96, 160, seed=8), ref, {})
    out = tmp_path / "out.png"
    code = main(
        [
            "edit",
            "--num-images",
            "2",
            "--seed",
            "4",
            "--ref",
            str(ref),
            "--steps",
            "1",
            "--no-progress",
            "-o",
            str(out),
        ]
    )
    assert code == 0 and not out.exists()
    metas = [read_png_metadata(tmp_path / f"out-{k}.png") for k in (1, 2)]
    assert [m["seed"] for m in metas] == ["4", "5"] and metas[0]["references"] == "ref.png"
    assert main(["edit", "--num-images", "2", "--then", "again", "-o", str(out)]) == 2  # refused, one line

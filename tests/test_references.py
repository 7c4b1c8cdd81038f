"""Reference images: the bucket rule's bound, ids that never collide under either placement, shape keys
that carry the whole context, and the miss policy for an engine built without multi-reference keys. (The
edit without references is diffusers' own, which tests/test_parity.py holds within 1e-5.)"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from engine import sampling
from engine.backends import DenoiserBase
from engine.backends.torch import TorchDenoiser
from engine.buckets import (
    FAMILIES,
    KONTEXT_RESOLUTIONS,
    MAX_REFERENCES,
    ShapeKey,
    buckets,
    edit_key,
    family_shape_keys,
    reference_bucket,
    reference_buckets,
    reference_budget,
    reference_token_sums,
    tokens,
)
from engine.dispatch import served_buckets
from engine.errors import ConfigError, ShapeNotServedError
from engine.pipeline import KontextPipeline
from engine.references import PLACEMENTS, Placement, context_ids, place
from engine.request import EditRequest
from engine.runtime import load

from .conftest import gradient_image

PROMPT = "put the hat from the second image on the cat"


class Recording(DenoiserBase):
    """The torch denoiser, keeping the img_ids of its last call."""

    def __init__(self, transformer) -> None:
        self.inner = TorchDenoiser(transformer)
        self.name, self.shape_keys = self.inner.name, None
        self.img_ids: torch.Tensor | None = None

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.img_ids = inputs["img_ids"]
        return self.inner(**inputs)


def test_the_bucket_rule_bounds_the_references_tokens():
    for family in FAMILIES:
        budget = reference_budget(family)
        for refs in range(1, MAX_REFERENCES + 1):
            most = max(tokens(*b) for b in reference_buckets(family, refs))
            assert refs * most <= budget, (family, refs)  # any mix of `refs` references fits the budget
            assert max(reference_token_sums(family, refs)) <= budget
    # one reference at 1 MP: the 17 Kontext resolutions themselves; the budget is the largest of them
    assert reference_buckets("1mp", 1) == KONTEXT_RESOLUTIONS and reference_budget("1mp") == 4150
    # three references at 1 MP: a third of the pixels each, aspect ratio kept
    assert reference_bucket(1000, 1000, "1mp", 3) == (576, 576)
    assert reference_bucket(1600, 700, "1mp", 3) == (864, 384)  # nearest aspect after rounding
    with pytest.raises(Exception, match="1 to 3 reference images"):
        reference_buckets("tiny", 4)


def test_placements_follow_comfyui():
    grids = [(8, 8), (8, 8), (8, 8), (4, 12)]
    # offset: right of the canvas when stacking below would make it taller than wide, else below
    assert place(grids, "offset") == [
        Placement(1, 0, 0),
        Placement(1, 8, 0),
        Placement(1, 0, 8),
        Placement(1, 16, 0),
    ]
    assert place(grids, "index") == [Placement(k, 0, 0) for k in (1, 2, 3, 4)]
    assert torch.equal(context_ids([(128, 64)], "offset"), sampling.image_ids(64, 128, index=1))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ids_never_collide(placement):
    """Every (index, row, col) of the target and of every context image is distinct, over a seeded sample
    of the bucket mixes an edit can have (tiny and 1 MP families, 1 to 3 references)."""
    rng = random.Random(0)
    for family, sample in (("tiny", 100), ("1mp", 30)):
        for refs in range(1, MAX_REFERENCES + 1):
            combos = list(itertools.product(buckets(family), *[reference_buckets(family, refs)] * refs))
            for main, *ref_sizes in rng.sample(combos, min(sample, len(combos))):
                ids = context_ids([main, *ref_sizes], placement)  # [M, 3]
                target = sampling.image_ids(main[1], main[0], index=0)  # [N, 3]
                every = torch.cat([target, ids])
                assert torch.unique(every, dim=0).shape[0] == every.shape[0], (family, main, ref_sizes)
                assert ids.shape[0] == sum(tokens(*s) for s in (main, *ref_sizes))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_two_references_give_the_rule_token_count(tiny, placement):
    recording = Recording(tiny.transformer)
    pipe = KontextPipeline(tiny, recording)
    image, refs = gradient_image(128, 128), [gradient_image(200, 90, seed=1), gradient_image(64, 150, seed=2)]
    request = EditRequest(image, PROMPT, steps=2, references=tuple(refs), placement=placement)
    out = pipe.edit(request, progress=False)
    ref_buckets = [reference_bucket(r.width, r.height, "tiny", 2) for r in refs]
    assert out.references == ref_buckets == [(128, 48), (48, 128)]
    context = tokens(128, 128) + sum(tokens(*b) for b in ref_buckets)
    assert (
        out.shape_key
        == ShapeKey(1, 64, context, 32)
        == edit_key((128, 128), None, "tiny", 32, [r.size for r in refs])
    )
    ids = recording.img_ids
    assert ids is not None and ids.shape == (64 + context, 3)
    assert torch.unique(ids, dim=0).shape[0] == ids.shape[0]  # distinct ids
    assert out.shape_key in family_shape_keys("tiny", 32, refs=2)
    plain = pipe.edit(EditRequest(image, PROMPT, steps=2), progress=False)
    assert (out.latents - plain.latents).abs().max() > 1e-3  # the references reach the output


def test_placements_differ_and_limits_are_refused(tiny):
    pipe = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    image, ref = gradient_image(128, 128), gradient_image(96, 96, seed=4)
    a, b = (
        pipe.edit(EditRequest(image, PROMPT, steps=2, references=(ref,), placement=p), progress=False)
        for p in PLACEMENTS
    )
    assert (a.latents - b.latents).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="at most 3 reference images"):
        EditRequest(image, PROMPT, steps=1, references=(ref,) * 4)
    with pytest.raises(ConfigError, match="placement must be one of offset, index"):
        EditRequest(image, PROMPT, steps=1, references=(ref,), placement="uxo")


def test_an_engine_without_reference_keys_goes_through_the_miss_policy(tiny_build):
    image, ref = gradient_image(128, 128), gradient_image(96, 96, seed=4)
    with load("tiny") as eager:
        assert eager.buckets(refs=1) == list(buckets("tiny"))  # torch serves every shape
        ref_out = eager.edit(image, PROMPT, seed=1, steps=2, references=[ref])
    with load(tiny_build, precision="fp32") as kontext:
        assert kontext.buckets(refs=1) == [] and len(kontext.buckets()) == 9
        with pytest.raises(ShapeNotServedError, match="b1_t64_c128_x32"):
            kontext.edit(image, PROMPT, seed=1, steps=2, references=[ref])
    with load(tiny_build, precision="fp32", miss_policy="torch") as kontext:
        out = kontext.edit(image, PROMPT, seed=1, steps=2, references=[ref])
        stats = kontext.stats()
    assert torch.equal(out.latents, ref_out.latents) and out.backend.startswith("torch-")
    assert (stats.misses, stats.fallbacks, stats.missed_keys) == (1, 1, {"b1_t64_c128_x32": 1})


def test_served_buckets_with_references():
    """A bucket is served with r references when every total the references can add is served."""
    plain, one_ref = family_shape_keys("tiny", 32), family_shape_keys("tiny", 32, refs=1)
    assert served_buckets(plain | one_ref, "tiny", refs=1) == list(buckets("tiny"))
    assert served_buckets(plain, "tiny", refs=1) == [] and len(served_buckets(plain, "tiny")) == 9
    square = {k for k in one_ref if k.target_tokens == 64}  # 128x128 with each possible reference
    assert served_buckets(frozenset(square), "tiny", refs=1) == [(128, 128)]
    assert served_buckets(frozenset(list(square)[1:]), "tiny", refs=1) == []  # one total missing

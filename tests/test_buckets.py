"""Buckets: the 17 resolutions, nearest-aspect choice, token counts, families, shape keys."""

from __future__ import annotations

import pytest

from engine.buckets import (
    FAMILIES,
    KONTEXT_RESOLUTIONS,
    ShapeKey,
    buckets,
    family_shape_keys,
    nearest_bucket,
    shape_key,
    tokens,
)
from engine.errors import BucketError


def test_the_17_kontext_resolutions():
    assert len(KONTEXT_RESOLUTIONS) == 17
    assert buckets("1mp") == KONTEXT_RESOLUTIONS
    assert (1024, 1024) in KONTEXT_RESOLUTIONS
    # symmetric: every (w, h) has its (h, w)
    assert {(h, w) for w, h in KONTEXT_RESOLUTIONS} == set(KONTEXT_RESOLUTIONS)


def test_nine_distinct_1mp_token_counts():
    counts = sorted({tokens(*b) for b in KONTEXT_RESOLUTIONS})
    assert len(counts) == 9
    assert counts[0] == 4042 and counts[-1] == 4150
    # with a same-bucket context and 512 text tokens: 9 sequence lengths 8596..8812
    seqs = sorted({k.total_tokens for k in family_shape_keys("1mp", 512)})
    assert len(seqs) == 9 and seqs[0] == 8596 and seqs[-1] == 8812


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 1000), (1024, 1024)),
        ((4000, 1000), (1568, 672)),  # wider than any bucket -> the widest
        ((1000, 4000), (672, 1568)),  # taller than any -> the tallest
        ((1920, 1080), (1392, 752)),  # 16:9 = 1.778; 1392/752 = 1.851, 1328/800 = 1.66
        ((1080, 1920), (752, 1392)),
        ((3, 2), (1248, 832)),  # exactly 1.5
        ((451, 300), (1248, 832)),  # 1.503
    ],
)
def test_nearest_bucket_by_aspect(size, expected):
    assert nearest_bucket(*size) == expected


def test_nearest_bucket_matches_diffusers_rule():
    """diffusers takes min((distance, w, h)): on a tie, the smaller width, which is also the first
    bucket in our order (sorted by width), so the two rules agree everywhere, ties included."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert tuple(PREFERRED_KONTEXT_RESOLUTIONS) == KONTEXT_RESOLUTIONS
    assert list(KONTEXT_RESOLUTIONS) == sorted(KONTEXT_RESOLUTIONS)
    for w in range(300, 3000, 37):
        for h in (317, 1000, 2203):
            _, dw, dh = min((abs(w / h - bw / bh), bw, bh) for bw, bh in PREFERRED_KONTEXT_RESOLUTIONS)
            assert nearest_bucket(w, h) == (dw, dh)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_are_multiples_of_16_and_symmetric(family):
    bs = buckets(family)
    assert bs, family
    for w, h in bs:
        assert w % 16 == 0 and h % 16 == 0 and w > 0 and h > 0
        assert (h, w) in bs


def test_family_areas_scale_as_named():
    for family, expected_mp in (("1mp", 1.0), ("0.5mp", 0.5), ("0.25mp", 0.25)):
        areas = [w * h / 2**20 for w, h in buckets(family)]
        assert all(abs(a - expected_mp) / expected_mp < 0.08 for a in areas), (family, areas)


def test_transposed_buckets_share_a_shape_key():
    for w, h in KONTEXT_RESOLUTIONS:
        assert shape_key((w, h), (w, h), 512) == shape_key((h, w), (h, w), 512)
    assert shape_key((1024, 1024), (1024, 1024), 512) == ShapeKey(1, 4096, 4096, 512)
    assert str(ShapeKey(1, 4096, 4096, 512)) == "b1_t4096_c4096_x512"


def test_bad_sizes_are_typed_errors():
    with pytest.raises(BucketError):
        tokens(1000, 1000)  # not multiples of 16
    with pytest.raises(BucketError):
        nearest_bucket(0, 100)
    with pytest.raises(BucketError):
        buckets("2mp")

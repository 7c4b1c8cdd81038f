"""KontextPipeline: which bucket an input lands in, and the shape key an edit produces."""

from __future__ import annotations

from engine.backends.torch import TorchDenoiser
from engine.buckets import ShapeKey, buckets, nearest_bucket
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image


def test_inputs_are_bucketed_in_the_pipeline_family(tiny):
    image = gradient_image(451, 300)
    own = KontextPipeline(tiny, TorchDenoiser(tiny.transformer)).prepare(EditRequest(image, "x", steps=1))
    assert own.bucket == nearest_bucket(451, 300, "tiny") and own.bucket in buckets("tiny")
    # an engine built for another family passes it: the context image is resized into that family
    other = KontextPipeline(tiny, TorchDenoiser(tiny.transformer), bucket_family="small")
    p = other.prepare(EditRequest(image, "x", steps=1))
    assert p.bucket == nearest_bucket(451, 300, "small") == (320, 208)
    assert p.ctx.shape[1] == (320 // 16) * (208 // 16) and p.size == p.bucket
    assert p.shape_key == ShapeKey(1, 260, 260, tiny.preset.max_sequence_length)


def test_size_override_sets_the_target_tokens_only(tiny):
    pipe = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    p = pipe.prepare(EditRequest(gradient_image(128, 128), "x", steps=3, size=(192, 80)))
    assert p.bucket == (128, 128) and p.size == (192, 80)
    assert p.shape_key == ShapeKey(1, 12 * 5, 8 * 8, tiny.preset.max_sequence_length)
    assert p.img_ids[:, 0].eq(0).all() and p.ctx_ids[:, 0].eq(1).all()
    assert p.schedule.sigmas.shape == (4,) and p.schedule.sigmas[-1] == 0

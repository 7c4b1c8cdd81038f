"""The prompt-embedding cache: a hit equals a miss bit for bit and skips both text encoders; a change of
the text encoders' weights (in place, or a new module) misses; the LRU evicts; engine.load shares one."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.backends.torch import TorchDenoiser
from engine.errors import ConfigError
from engine.pipeline import KontextPipeline
from engine.prompt_cache import PromptCache, weights_fingerprint
from engine.runtime import load

from .conftest import gradient_image


class CallCounter:
    """Counts the forwards of a module through a hook (the module itself is untouched)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1


@pytest.fixture
def own_encoders(tiny):
    """tiny's components with private copies of the text encoders, free to be changed by a test."""
    return dataclasses.replace(
        tiny, text_encoder=copy.deepcopy(tiny.text_encoder), text_encoder_2=copy.deepcopy(tiny.text_encoder_2)
    )


def _pipe(components, cache):
    return KontextPipeline(components, TorchDenoiser(components.transformer), prompt_cache=cache)


def test_hit_equals_miss_bit_for_bit_and_skips_the_encoders(own_encoders):
    cache = PromptCache()
    pipe = _pipe(own_encoders, cache)
    t5, clip = CallCounter(own_encoders.text_encoder_2), CallCounter(own_encoders.text_encoder)
    miss = pipe.encode_prompt("add a red hat", batch=2)
    hit = pipe.encode_prompt("add a red hat", batch=2)
    uncached = _pipe(own_encoders, None).encode_prompt("add a red hat", batch=2)
    for a, b, c in zip(miss, hit, uncached, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert miss[0].shape[0] == 2  # batch applied after the cache
    assert (cache.hits, cache.misses) == (1, 1)
    assert t5.calls == 2 and clip.calls == 2  # one miss here + one uncached call; the hit ran neither
    pipe.encode_prompt("another prompt")
    assert cache.misses == 2


def test_a_change_of_weights_misses(own_encoders):
    cache = PromptCache()
    pipe = _pipe(own_encoders, cache)
    first = pipe.encode_prompt("add a red hat")[0]
    with torch.no_grad():
        next(own_encoders.text_encoder_2.parameters()).add_(0.5)  # in place: version counter moves
    changed = pipe.encode_prompt("add a red hat")[0]
    assert cache.misses == 2 and not torch.equal(first, changed)
    with torch.no_grad():  # a new CLIP with the same values: a new module, a new fingerprint
        reloaded = dataclasses.replace(own_encoders, text_encoder=copy.deepcopy(own_encoders.text_encoder))
    _pipe(reloaded, cache).encode_prompt("add a red hat")
    assert cache.misses == 3
    pipe.encode_prompt("add a red hat")
    assert cache.hits == 1  # the unchanged pair still hits


def test_fingerprint_is_stable_and_cheap_to_recompute(tiny):
    a = weights_fingerprint(tiny.text_encoder, tiny.text_encoder_2)
    assert a == weights_fingerprint(tiny.text_encoder, tiny.text_encoder_2)
    assert a != weights_fingerprint(tiny.text_encoder_2, tiny.text_encoder)  # order is part of the key


def test_lru_evicts_the_least_recently_used():
    cache = PromptCache(capacity=2)
    one = (torch.zeros(1), torch.zeros(1))
    key = lambda p: (p, "w", 8, torch.float32, "cpu")  # noqa: E731
    for p in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cache.get_or_compute(key(p), lambda: one)
    assert len(cache) == 2 and cache.misses == 3 and cache.hits == 1
    cache.get_or_compute(key("a"), lambda: one)
    assert cache.hits == 2
    cache.get_or_compute(key("b"), lambda: one)
    assert cache.misses == 4
    with pytest.raises(ConfigError):
        PromptCache(capacity=0)


def test_engine_edits_share_one_cache():
    with load("tiny") as kontext:
        image = gradient_image(128, 128)
        a = kontext.edit(image, "add a red hat", steps=1)
        b = kontext.edit(image, "add a red hat", steps=1)
        assert torch.equal(a.latents, b.latents)
        assert (kontext.prompt_cache.hits, kontext.prompt_cache.misses) == (1, 1)

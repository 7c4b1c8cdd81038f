"""Dispatch: the engine's frozen shape keys decide; a miss is a typed error naming the buckets served,
or (policy torch) the torch result and a counted fallback. Never silent."""

from __future__ import annotations

import pytest
import torch

from engine.backends import DENOISER_INPUTS, Denoiser, DenoiserBase
from engine.backends.inputs import dummy_inputs
from engine.buckets import ShapeKey, edit_key, family_shape_keys
from engine.config import PRESETS, LoadOptions
from engine.dispatch import Dispatcher, served_buckets
from engine.errors import ConfigError, ShapeNotServedError
from engine.runtime import load

from .conftest import gradient_image

KEYS = family_shape_keys("tiny", 32)
SQUARE = ShapeKey(1, 64, 64, 32)


class Fake(DenoiserBase):
    """A denoiser that returns a constant, to see which one ran."""

    def __init__(self, name: str, value: float, keys: frozenset[ShapeKey] | None) -> None:
        self.name, self.value, self.shape_keys = name, value, keys

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.full_like(inputs["hidden_states"], self.value)


def _args(image_tokens: int) -> list[torch.Tensor]:
    x = dummy_inputs(PRESETS["tiny"].transformer, ShapeKey(1, image_tokens // 2, image_tokens // 2, 32))
    return [x[k] for k in DENOISER_INPUTS]


def test_denoiser_base_packs_the_seven_arguments_once_for_every_denoiser():
    """DenoiserBase: positional and keyword calls reach run() as the same {DENOISER_INPUTS name: tensor},
    in that order; every backend and wrapper is one, with close() (the protocol's)."""
    import inspect

    from engine.backends.onnxruntime import OrtDenoiser
    from engine.backends.recording import RecordingDenoiser
    from engine.backends.tensorrt import TrtDenoiser
    from engine.backends.torch import TorchDenoiser
    from engine.bench.probes import TimedDenoiser
    from engine.builder.export import DenoiserExportWrapper
    from engine.dispatch import DispatchingDenoiser

    seen: list[dict[str, torch.Tensor]] = []

    class Spy(DenoiserBase):
        name = "spy"

        def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            seen.append(inputs)
            return inputs["hidden_states"]

    args = _args(128)
    Spy()(*args)
    Spy()(**dict(zip(DENOISER_INPUTS, args, strict=True)))
    for got in seen:
        assert list(got) == list(DENOISER_INPUTS)
        assert all(got[k] is a for k, a in zip(DENOISER_INPUTS, args, strict=True))
    assert isinstance(Spy(), Denoiser) and Spy().shape_keys is None
    Spy().close()
    backends = (TorchDenoiser, OrtDenoiser, TrtDenoiser)
    for cls in (*backends, RecordingDenoiser, TimedDenoiser, DispatchingDenoiser):
        assert issubclass(cls, DenoiserBase), cls
    wrapped = DenoiserExportWrapper(torch.nn.Identity())  # the ONNX graph's input names: the base's
    assert list(inspect.signature(wrapped.forward).parameters) == list(DENOISER_INPUTS)
    with pytest.raises(NotImplementedError, match="run"):
        DenoiserBase()(*args)


def test_keys_and_buckets():
    assert edit_key((128, 128), None, "tiny", 32) == SQUARE
    assert edit_key((130, 120), (160, 160), "tiny", 32) == ShapeKey(1, 100, 64, 32)
    only_square = served_buckets(frozenset({SQUARE}), "tiny")
    assert only_square == [(128, 128)]
    assert len(served_buckets(KEYS, "tiny")) == 9


def test_error_policy_names_the_buckets_and_counts():
    engine = Fake("engine", 1.0, frozenset({SQUARE}))
    d = Dispatcher(engine, family="tiny")
    assert d.resolve(SQUARE) is engine
    with pytest.raises(ShapeNotServedError, match=r"serves buckets 128x128 \(family tiny") as e:
        d.resolve(ShapeKey(1, 60, 60, 32))
    assert "miss_policy='torch'" in str(e.value) and "kontext build" in str(e.value)
    s = d.stats()
    assert (s.hits, s.misses, s.fallbacks, s.missed_keys) == (1, 1, 0, {"b1_t60_c60_x32": 1})


def test_torch_policy_falls_back_per_call_and_counts():
    engine, torch_ = Fake("engine", 1.0, frozenset({SQUARE})), Fake("torch", 2.0, None)
    d = Dispatcher(engine, family="tiny", policy="torch", fallback=torch_)
    routed = d.denoiser()
    assert routed.shape_keys == frozenset({SQUARE})
    assert routed(*_args(128)).unique().item() == 1.0  # 64 + 64 tokens: the engine
    assert routed(*_args(120)).unique().item() == 2.0  # 60 + 60: torch
    assert d.stats().fallbacks == 1 and d.stats().hits == 1
    with pytest.raises(ConfigError):
        Dispatcher(engine, family="tiny", policy="torch")  # no fallback given
    with pytest.raises(ConfigError, match="miss_policy must be one of error, torch"):
        LoadOptions(miss_policy="ignore")  # the one check of a policy (a Dispatcher is given a checked one)


def test_engine_miss_error_then_torch_fallback(tiny_build):
    image = gradient_image(128, 128)
    with load(tiny_build, precision="fp32") as kontext:
        assert kontext.shape_keys == KEYS
        with pytest.raises(ShapeNotServedError, match="it serves buckets 80x192, 96x176"):
            kontext.edit(image, "a hat", seed=1, steps=2, size=(160, 160))
        assert kontext.stats().misses == 1
    with load("tiny") as eager:
        ref = eager.edit(image, "a hat", seed=1, steps=2, size=(160, 160))
    with load(tiny_build, precision="fp32", miss_policy="torch") as kontext:
        out = kontext.edit(image, "a hat", seed=1, steps=2, size=(160, 160))
        stats = kontext.stats()
    assert torch.equal(out.latents, ref.latents)  # exactly the torch result
    assert out.backend.startswith("torch-") and not kontext.name.startswith("torch-")  # says who ran
    assert (stats.misses, stats.fallbacks, stats.missed_keys) == (1, 1, {"b1_t100_c64_x32": 1})

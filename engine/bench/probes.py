"""Observers that change nothing: a timed Denoiser for our pipeline (the recording one is
engine.backends.recording), and timed
stand-ins for diffusers' transformer and VAE (composition given to FluxKontextPipeline, no monkeypatching)."""

from __future__ import annotations

from typing import Any

import torch

from ..backends import Denoiser, DenoiserBase
from ..buckets import ShapeKey
from .timing import CallClock


class TimedDenoiser(DenoiserBase):
    """A Denoiser that times every call of the one it wraps on `clock`."""

    def __init__(self, inner: Denoiser, clock: CallClock) -> None:
        self.inner = inner
        self.clock = clock
        self.name: str = inner.name
        self.shape_keys: frozenset[ShapeKey] | None = inner.shape_keys
        self.stages = getattr(inner, "stages", None)  # the split forward, untimed (step caches use it)

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.clock.tic()
        out = self.inner(**inputs)
        self.clock.toc()
        return out


class _TimedModule(torch.nn.Module):
    """Base of the diffusers stand-ins: holds the real module and answers config, device and dtype for it."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype


class TimedTransformer(_TimedModule):
    """diffusers' FluxTransformer2DModel with each forward timed on `clock` (one call = one step)."""

    def __init__(self, inner: Any, clock: CallClock) -> None:
        super().__init__(inner)
        self.clock = clock

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.tic()
        out = self.inner(*args, **kwargs)
        self.clock.toc()
        return out


class TimedVae(_TimedModule):
    """diffusers' AutoencoderKL with encode() and decode() timed on their own clocks."""

    def __init__(self, inner: Any, encode_clock: CallClock, decode_clock: CallClock) -> None:
        super().__init__(inner)
        self.encode_clock = encode_clock
        self.decode_clock = decode_clock

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.encode_clock.tic()
        out = self.inner.encode(*args, **kwargs)
        self.encode_clock.toc()
        return out

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self.decode_clock.tic()
        out = self.inner.decode(*args, **kwargs)
        self.decode_clock.toc()
        return out

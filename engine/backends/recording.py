"""A Denoiser that records the calls of the one it wraps: calibration data for the build, reference
trajectories for verification and the benchmark's quality pass. It changes nothing it passes on."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import torch

from ..buckets import ShapeKey
from . import Denoiser, DenoiserBase


@dataclass
class DenoiserCall:
    """One recorded call: its index since the last reset, its keyword inputs, and its output."""

    index: int
    inputs: dict[str, torch.Tensor]  # DENOISER_INPUTS -> detached copy
    output: torch.Tensor  # [B, N + M, 64] detached copy


class RecordingDenoiser(DenoiserBase):
    """Runs `inner` and keeps copies of the calls whose index is in `keep` (None: every call)."""

    def __init__(self, inner: Denoiser, keep: Container[int] | None = None) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.shape_keys: frozenset[ShapeKey] | None = inner.shape_keys
        self.keep = keep
        self.count = 0
        self.calls: list[DenoiserCall] = []

    def reset(self, keep: Container[int] | None = None) -> None:
        """Forget the recorded calls and count from 0 again (one edit's steps are indices 0..steps-1)."""
        self.keep, self.count, self.calls = keep, 0, []

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.inner(**inputs)
        if self.keep is None or self.count in self.keep:
            copies = {k: v.detach().clone() for k, v in inputs.items()}
            self.calls.append(DenoiserCall(self.count, copies, out.detach().clone()))
        self.count += 1
        return out

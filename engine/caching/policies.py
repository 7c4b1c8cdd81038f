"""Per-edit step caches: the state one edit's sampling loop consults at each step.

A StepCache is made for one edit (`new_step_cache`) and dropped with it, so two edits never share one,
whatever engine or thread runs them. Each step the loop asks it for the velocity instead of calling the
denoiser; it calls the denoiser (or its split forward) when it decides to compute, and counts the full
passes it made (`computed`).

Semantics are diffusers 0.42.1's hooks, step for step (tests/test_caching_parity.py holds them together):
  FirstBlockCache   hooks/first_block_cache.py (needs the split forward)
  MagCacheResidual  hooks/mag_cache.py: the block stack's residual (needs the split forward)
  MagCacheVelocity  the same decisions; a skipped step reuses the last velocity (any backend)
  TaylorSeer        hooks/taylorseer_cache.py in lite mode: proj_out's output, i.e. the velocity, is
                    the cached feature (any backend)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..errors import ConfigError
from .ratios import ratios_for
from .spec import CacheSpec, FbcConfig, MagCacheConfig, TaylorSeerConfig
from .stages import Embedded, ForwardStages, stages_of

DenoiseFn = Callable[..., torch.Tensor]


class StepCache:
    """One edit's cache. `velocity(i, ...)` -> the velocity of the N target tokens at step i."""

    form = ""  # what is cached: residual | velocity | first-block

    def __init__(self, spec: CacheSpec, steps: int) -> None:
        self.spec = spec
        self.steps = steps
        self.computed = 0  # full transformer passes so far
        self.computed_steps: list[int] = []  # the step index of each

    @property
    def label(self) -> str:
        return f"{self.spec.label} ({self.form})"

    def velocity(
        self, i: int, denoiser: DenoiseFn, inputs: dict[str, torch.Tensor], n: int
    ) -> torch.Tensor:  # [B, N, 64]
        raise NotImplementedError

    def _count(self, i: int) -> None:
        self.computed += 1
        self.computed_steps.append(i)


# --------------------------------------------------------------------------- first-block cache


class FirstBlockCache(StepCache):
    """Every step runs the first block; the rest run only when its residual moved by more than the
    threshold since the last full pass, else the rest's residuals of that pass are added back."""

    form = "first-block"

    def __init__(self, spec: CacheSpec, steps: int, stages: ForwardStages) -> None:
        super().__init__(spec, steps)
        assert isinstance(spec.config, FbcConfig)
        self.threshold = spec.config.threshold
        self.stages = stages
        self.head_residual: torch.Tensor | None = None  # first block's residual at the last full pass
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None  # the rest's (image, text) residuals

    def velocity(self, i: int, denoiser: DenoiseFn, inputs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        s = self.stages
        x = s.embed(inputs)
        first = s.first_block(x)
        residual = first.hidden - x.hidden  # [B, N + M, D]
        if self.tail is None or self._should_compute(residual):
            out = s.rest(first)
            self.tail = (out.hidden - first.hidden, out.encoder - first.encoder)
            self.head_residual = residual
            self._count(i)
        else:
            out = replace(first, hidden=self.tail[0] + first.hidden, encoder=self.tail[1] + first.encoder)
        return s.head(out)[:, :n]

    # Mirrors diffusers hooks/first_block_cache.py::FBCHeadBlockHook._should_compute_remaining_blocks (v0.42)
    def _should_compute(self, residual: torch.Tensor) -> bool:
        prev = self.head_residual
        if prev is None:
            return True
        diff = ((residual - prev).abs().mean() / prev.abs().mean()).item()
        return diff > self.threshold


# --------------------------------------------------------------------------- MagCache


class MagCacheSchedule:
    """MagCache's decision, which depends on the step and the calibrated ratios only (a schedule).

    Mirrors diffusers hooks/mag_cache.py::MagCacheHeadHook.new_forward (v0.42), float32 arithmetic
    included (its ratios are a float32 tensor), so the same accumulated error crosses the threshold.
    """

    def __init__(self, config: MagCacheConfig, steps: int) -> None:
        self.config = config
        self.steps = steps
        self.ratios = ratios_for(config.ratios, steps)  # [steps] float32
        self.retention_step = int(config.retention_ratio * steps + 0.5)
        self.accumulated_ratio: Any = 1.0  # a float32 0-d tensor once a ratio is applied, as in diffusers
        self.accumulated_err: Any = 0.0
        self.accumulated_steps = 0

    def skip(self, i: int, have_cache: bool) -> bool:
        if i < self.retention_step:
            return False
        scale = self.ratios[i] if i < len(self.ratios) else 1.0
        self.accumulated_ratio = self.accumulated_ratio * scale
        self.accumulated_steps += 1
        self.accumulated_err = self.accumulated_err + abs(1.0 - self.accumulated_ratio)
        if (
            have_cache
            and bool(self.accumulated_err <= self.config.threshold)
            and self.accumulated_steps <= self.config.max_skip_steps
        ):
            return True
        self.accumulated_ratio = 1.0
        self.accumulated_steps = 0
        self.accumulated_err = 0.0
        return False


class MagCacheResidual(StepCache):
    """A skipped step adds the block stack's last residual to the embedded image tokens and runs the
    head (norm_out, proj_out) on it: diffusers' MagCache hook on the first and last blocks."""

    form = "residual"

    def __init__(self, spec: CacheSpec, steps: int, stages: ForwardStages) -> None:
        super().__init__(spec, steps)
        assert isinstance(spec.config, MagCacheConfig)
        self.schedule = MagCacheSchedule(spec.config, steps)
        self.stages = stages
        self.residual: torch.Tensor | None = None  # [B, N + M, D]

    def velocity(self, i: int, denoiser: DenoiseFn, inputs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        s = self.stages
        x: Embedded = s.embed(inputs)
        if self.schedule.skip(i, have_cache=self.residual is not None):
            assert self.residual is not None
            out = replace(x, hidden=x.hidden + self.residual)
        else:
            out = s.rest(s.first_block(x))
            self.residual = out.hidden - x.hidden
            self._count(i)
        return s.head(out)[:, :n]


class MagCacheVelocity(StepCache):
    """MagCache's decisions on a backend without the split forward: a skipped step reuses the last
    computed velocity (the model's whole output is all such a backend gives)."""

    form = "velocity"

    def __init__(self, spec: CacheSpec, steps: int) -> None:
        super().__init__(spec, steps)
        assert isinstance(spec.config, MagCacheConfig)
        self.schedule = MagCacheSchedule(spec.config, steps)
        self.last: torch.Tensor | None = None  # [B, N, 64]

    def velocity(self, i: int, denoiser: DenoiseFn, inputs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        if self.schedule.skip(i, have_cache=self.last is not None):
            assert self.last is not None
            return self.last
        self.last = denoiser(**inputs)[:, :n]
        self._count(i)
        return self.last


# --------------------------------------------------------------------------- TaylorSeer


class TaylorSeer(StepCache):
    """Full passes on diffusers' TaylorSeer schedule; between them, a Taylor series of the velocity
    (finite differences of the last max_order + 1 full passes) predicts it. Factors kept in float32."""

    form = "velocity"

    def __init__(self, spec: CacheSpec, steps: int) -> None:
        super().__init__(spec, steps)
        assert isinstance(spec.config, TaylorSeerConfig)
        self.config = spec.config
        self.factors: dict[int, torch.Tensor] = {}  # order -> [B, N, 64] float32
        self.last_update: int | None = None

    # Mirrors diffusers hooks/taylorseer_cache.py::TaylorSeerCacheHook._measure_should_compute (v0.42)
    def should_compute(self, i: int) -> bool:
        c = self.config
        warmup = i < c.disable_cache_before_step
        interval = (i - c.disable_cache_before_step - 1) % c.cache_interval == 0
        cooldown = c.disable_cache_after_step is not None and i >= c.disable_cache_after_step
        return warmup or interval or cooldown or self.last_update is None

    def velocity(self, i: int, denoiser: DenoiseFn, inputs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        if not self.should_compute(i):
            return self._predict(i)
        v = denoiser(**inputs)[:, :n]
        self._update(i, v)
        self._count(i)
        return v

    # Mirrors diffusers hooks/taylorseer_cache.py::TaylorSeerState.update (v0.42)
    def _update(self, i: int, features: torch.Tensor) -> None:
        new = {0: features}
        if self.last_update is not None:
            delta = i - self.last_update
            for j in range(self.config.max_order):
                prev = self.factors.get(j)
                if prev is None or prev.shape != new[j].shape:
                    break
                new[j + 1] = (new[j] - prev.to(features.dtype)) / delta
        self.factors = {order: f.to(torch.float32) for order, f in new.items()}
        self.dtype = features.dtype
        self.last_update = i

    # Mirrors diffusers hooks/taylorseer_cache.py::TaylorSeerState.predict (v0.42)
    def _predict(self, i: int) -> torch.Tensor:
        assert self.last_update is not None
        offset = i - self.last_update
        out = torch.zeros_like(self.factors[0], dtype=self.dtype)
        for order in range(len(self.factors)):
            out = out + self.factors[order].to(self.dtype) * (offset**order / math.factorial(order))
        return out


# --------------------------------------------------------------------------- choosing one


def needs_stages(spec: CacheSpec) -> bool:
    """Whether the spec can only run on a backend with the split forward."""
    return spec.method == "fbc" or (isinstance(spec.config, MagCacheConfig) and spec.config.on == "residual")


def check_cache(spec: CacheSpec, denoiser: object) -> None:
    """ConfigError (one line) when `denoiser` cannot run `spec`: a residual cache on a one-piece backend."""
    if stages_of(denoiser) is None:
        refuse_unsplit(spec, getattr(denoiser, "name", type(denoiser).__name__))


def refuse_unsplit(spec: CacheSpec, backend: str) -> None:
    """ConfigError (one line) when `spec` needs the split forward, which `backend` (one piece) lacks."""
    if spec.enabled and needs_stages(spec):
        raise ConfigError(
            f"cache {spec.label} needs the transformer's first block apart from the rest, and {backend} runs "
            "it as one piece (a built engine, CUDA graphs or context parallelism): use magcache (on the "
            "velocity) or taylorseer there, or the torch backend without +graphs"
        )


def new_step_cache(spec: CacheSpec | None, denoiser: object, steps: int) -> StepCache | None:
    """A fresh cache for one edit of `steps` steps through `denoiser`; None when `spec` is off or None."""
    if spec is None or not spec.enabled:
        return None
    check_cache(spec, denoiser)
    stages = stages_of(denoiser)
    config = spec.config
    if isinstance(config, FbcConfig):
        assert stages is not None
        return FirstBlockCache(spec, steps, stages)
    if isinstance(config, MagCacheConfig):
        if stages is not None and config.on in ("auto", "residual"):
            return MagCacheResidual(spec, steps, stages)
        return MagCacheVelocity(spec, steps)
    return TaylorSeer(spec, steps)

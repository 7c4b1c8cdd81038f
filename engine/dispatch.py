"""Dispatch: edit -> bucket -> shape key -> the denoiser that serves it, or the miss policy.

The primary denoiser's frozen set of shape keys is the single source of truth: a key in it runs on
the primary; any other key is a ShapeNotServedError naming the buckets served (policy "error") or
runs on the torch transformer (policy "torch"). Either way a miss is logged and counted.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from .backends import Denoiser, DenoiserBase, Signature, call_signature, describe_keys, key_signature
from .buckets import ShapeKey, buckets, family_shape_keys, tokens
from .config import MISS_POLICIES as MISS_POLICIES  # defined with LoadOptions, which checks it
from .errors import ConfigError, ShapeNotServedError

log = logging.getLogger(__name__)


def served_buckets(keys: frozenset[ShapeKey], family: str, refs: int = 0) -> list[tuple[int, int]]:
    """The family's buckets whose same-bucket edits with `refs` references are all served: every
    total the references can add (buckets.family_shape_keys), for some (batch, text tokens) of `keys`."""
    out = []
    for b in buckets(family):
        for batch, text in {(k.batch, k.text_tokens) for k in keys}:
            family_keys = family_shape_keys(family, text, batch, refs)
            wanted = {k for k in family_keys if k.target_tokens == tokens(*b)}
            if wanted <= keys:
                out.append(b)
                break
    return out


@dataclass(frozen=True)
class DispatchStats:
    """Counts since load: edits (or adapter calls) served by the primary denoiser, missed, and fallen back."""

    hits: int
    misses: int
    fallbacks: int
    missed_keys: dict[str, int]  # shape key string -> misses


class Dispatcher:
    """Chooses the denoiser of each shape key: the primary (built) one for its keys, else the miss policy."""

    def __init__(
        self,
        primary: Denoiser,
        *,
        family: str,
        policy: str = "error",
        fallback: Denoiser | None = None,
        rebuild_hint: str = "`kontext build`",
    ) -> None:
        """policy: a LoadOptions.miss_policy (checked there); "torch" needs the fallback denoiser."""
        if policy == "torch" and fallback is None:
            raise ConfigError("miss policy 'torch' needs a fallback denoiser (the torch transformer)")
        self.primary = primary
        self.family = family
        self.policy = policy
        self.fallback = fallback
        self.rebuild_hint = rebuild_hint
        self.shape_keys: frozenset[ShapeKey] | None = primary.shape_keys  # None: it serves any shape
        self._signatures = None if self.shape_keys is None else {key_signature(k) for k in self.shape_keys}
        self._lock = threading.Lock()
        self._hits = 0
        self._missed: Counter[str] = Counter()
        self._fallbacks = 0

    def serves(self, key: ShapeKey) -> bool:
        return self.shape_keys is None or key in self.shape_keys

    def resolve(self, key: ShapeKey) -> Denoiser:
        """The denoiser for `key`: the primary if it serves it, else the fallback or a ShapeNotServedError."""
        if self.serves(key):
            return self._hit()
        return self._miss(str(key))

    def resolve_signature(self, sig: Signature) -> Denoiser:
        """The denoiser for one call's (batch, image tokens, text tokens), counted like resolve()."""
        if self._signatures is None or sig in self._signatures:
            return self._hit()
        return self._miss(f"(batch {sig[0]}, image tokens {sig[1]}, text tokens {sig[2]})")

    def _hit(self) -> Denoiser:
        with self._lock:
            self._hits += 1
        return self.primary

    def _miss(self, what: str) -> Denoiser:
        with self._lock:
            self._missed[what] += 1
            if self.fallback is not None and self.policy == "torch":
                self._fallbacks += 1
        if self.policy == "torch" and self.fallback is not None:
            log.warning(
                "shape %s is not served by %s; falling back to %s (counted)",
                what,
                self.primary.name,
                self.fallback.name,
            )
            return self.fallback
        log.warning("shape %s is not served by %s (miss policy: error)", what, self.primary.name)
        raise ShapeNotServedError(self.not_served_message(what))

    def not_served_message(self, what: str) -> str:
        keys = self.shape_keys or frozenset()
        served = ", ".join(f"{w}x{h}" for w, h in served_buckets(keys, self.family)) or "none of the family's"
        return (
            f"shape {what} is not served by {self.primary.name}; it serves buckets {served} (family "
            f"{self.family}; shape keys {describe_keys(keys)}). Edit at one of those sizes (the input's "
            f'bucket: size=None in Python, no --size on the CLI, size "auto" over HTTP), fall back to '
            f"PyTorch (miss_policy='torch', or --miss-policy torch on kontext edit and serve), or rebuild "
            f"for this shape with {self.rebuild_hint}"
        )

    def stats(self) -> DispatchStats:
        with self._lock:
            return DispatchStats(self._hits, sum(self._missed.values()), self._fallbacks, dict(self._missed))

    def denoiser(self) -> DispatchingDenoiser:
        """A Denoiser routing every call by its tensor shapes (for callers owning the loop: diffusers)."""
        return DispatchingDenoiser(self)


class DispatchingDenoiser(DenoiserBase):
    """Routes each call by its (batch, image tokens, text tokens): counted per call, not per edit.

    Keys that differ only in the target/context split share tensor shapes, so the call's shapes
    decide without reading img_ids (no device sync). close() frees nothing: the engine owns the
    dispatcher's denoisers.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.name = f"dispatch({dispatcher.primary.name})"
        self.shape_keys = dispatcher.shape_keys

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        sig = call_signature(inputs["hidden_states"], inputs["encoder_hidden_states"])
        return self.dispatcher.resolve_signature(sig)(**inputs)

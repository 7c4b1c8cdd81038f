"""T5 off the card between prompts: `released` (kept in pinned host memory, copied to the card for each
prompt it encodes, dropped after) or `cpu` (run where it lives). Either way the prompt cache
(engine/prompt_cache.py) keeps each prompt's embeddings, so a repeated prompt never touches T5: its
host tensors never move, so the cache's weights fingerprint (storage address, version, values) is the
same before and after each encode, and hits stay hits.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

T5_PLACEMENTS = ("released", "cpu")


class OffloadedEncoder(torch.nn.Module):
    """A text encoder whose weights live in host memory. Called as the encoder is (`enc(ids, ...)[0]`:
    the last hidden state [B, L, D] on the caller's device)."""

    def __init__(self, encoder: torch.nn.Module, placement: str, device: torch.device) -> None:
        super().__init__()
        if placement not in T5_PLACEMENTS:
            raise ConfigError(f"T5 placement must be one of {', '.join(T5_PLACEMENTS)}, got {placement!r}")
        self.encoder = encoder.to("cpu")
        self.placement = placement
        self.device = torch.device(device)
        self.loads = 0  # copies to the card so far (released)
        self._lock = threading.Lock()  # one encode at a time swaps the weights (engine workers share T5)
        if placement == "released" and self.device.type == "cuda":
            for t in _tensors(self.encoder):
                t.data = t.data.pin_memory()
        self.config = getattr(encoder, "config", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        if self.placement == "cpu":
            out = self.encoder(input_ids.to("cpu"), **kwargs)[0]  # [B, L, D]; read-only: no lock
            return (out.to(input_ids.device),)
        return (self._on_card(input_ids, **kwargs),)

    def _on_card(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Copy every weight to the card, encode, put the host tensors back (the card's copies are freed
        when this returns)."""
        with self._lock:
            return self._swap_and_encode(input_ids, **kwargs)

    def _swap_and_encode(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        host = [(t, t.data) for t in _tensors(self.encoder)]
        try:
            for t, data in host:
                t.data = data.to(self.device, non_blocking=True)
            self.loads += 1
            return self.encoder(input_ids.to(self.device), **kwargs)[0]  # [B, L, D]
        finally:
            for t, data in host:
                t.data = data

    def _apply(self, fn: Any, recurse: bool = True) -> OffloadedEncoder:  # type: ignore[override]
        return self  # Module.to() leaves T5 in host memory


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters (tied ones once) and buffers."""
    seen: set[int] = set()
    out = []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out

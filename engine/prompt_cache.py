"""An LRU of prompt embeddings, so that a second edit with the same prompt skips T5 and CLIP.

Keyed by (prompt, text-encoder weights fingerprint, T5 tokens, dtype, device). The fingerprint changes
when a text encoder's weights change: a parameter replaced (its storage moves), changed in place (its
version counter moves), or loaded anew (a sample of its values moves). A hit returns exactly the
tensors the miss computed. Thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from .errors import ConfigError

Embeddings = tuple[torch.Tensor, torch.Tensor]  # T5 states [1, L, D_txt], CLIP pooled [1, D_pooled]
CacheKey = tuple[str, str, int, torch.dtype, str]

SAMPLE = 8  # values read from each end of every parameter for the fingerprint


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype, device, storage address and version counter,
    plus its first and last SAMPLE values (read in one transfer). Milliseconds for T5-XXL."""
    h = hashlib.sha256()
    samples = []
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            version = getattr(p, "_version", 0)
            h.update(f"{i}:{name}:{tuple(p.shape)}:{p.dtype}:{p.device}:{p.data_ptr()}:{version}".encode())
            flat = p.detach().reshape(-1)
            samples.append(torch.cat([flat[:SAMPLE], flat[-SAMPLE:]]).float().cpu())
    if samples:
        h.update(torch.cat(samples).numpy().tobytes())
    return h.hexdigest()


class PromptCache:
    """prompt -> (T5 states, CLIP pooled), the `capacity` most recently used prompts."""

    def __init__(self, capacity: int = 32) -> None:
        if capacity < 1:
            raise ConfigError(f"prompt cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, Embeddings] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: CacheKey, compute: Callable[[], Embeddings]) -> Embeddings:
        """The cached embeddings of `key`, or compute, store and return them."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        value = compute()  # outside the lock: T5 takes a while, other prompts need not wait
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

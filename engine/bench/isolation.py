"""Proof that no contestant changes another's modules: fingerprints of a module tree's tensors.

A fingerprint records, per parameter and buffer, where it lives (storage address, dtype, shape, device)
and what it holds (float64 sum and sum of squares), read back in one transfer. Equal fingerprints
before and after a contestant ran mean it neither replaced nor modified any of those tensors.
"""

from __future__ import annotations

import torch

Fingerprint = dict[str, tuple[object, ...]]


def fingerprint(module: torch.nn.Module) -> Fingerprint:
    """name -> (type, shape, dtype, device, address, sum, sum of squares) for every parameter and buffer."""
    names, meta, sums = [], [], []
    first = next(module.parameters(), None)
    dev = first.device if first is not None else torch.device("cpu")
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, t in tensors:
        data = t.detach()
        names.append(name)
        meta.append(
            (type(data).__name__, tuple(data.shape), str(data.dtype), str(data.device), data.data_ptr())
        )
        if type(data) is torch.Tensor and not data.dtype.is_complex:
            x = data.to(torch.float64)
            sums.append(torch.stack([x.sum(), (x * x).sum()]).to(dev))
        else:  # tensor subclasses (torchao's FP8 weights): identity and shape only
            sums.append(torch.zeros(2, dtype=torch.float64, device=dev))
    values = torch.stack(sums).tolist() if sums else []  # one transfer
    return {n: (*m, *v) for n, m, v in zip(names, meta, values, strict=True)}


def changed(before: Fingerprint, after: Fingerprint) -> list[str]:
    """Names whose tensor was replaced, modified, added or removed."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))

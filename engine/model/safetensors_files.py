"""safetensors files read without trusting them: the header parsed and the file's size checked against
it before any tensor is read (a truncated download is named, not a traceback), the bytes a load will
take computed from headers alone, and the tensors read straight onto their device."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

# safetensors dtype names -> bytes per element
_ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, offset of the data) of a complete safetensors file, or a
    WeightsError naming the file: unreadable, not safetensors, or shorter than its header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e}); download it again") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
        raise WeightsError(
            f"{path} is not a safetensors file (truncated or damaged); download it again"
        ) from e
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise WeightsError(f"{path} has a damaged safetensors header; download it again") from e
    if size < 8 + n + end:
        raise WeightsError(f"{path} is truncated ({size:,} of {8 + n + end:,} bytes); download it again")
    return header, 8 + n


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the header alone."""
    return {k: tuple(int(d) for d in t["shape"]) for k, t in read_header(path)[0].items()}


def load_bytes(files: Iterable[Path], dtype: torch.dtype) -> int:
    """Bytes the files' tensors take once loaded with floating tensors cast to `dtype`."""
    total = 0
    for f in files:
        for t in read_header(f)[0].values():
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            total += numel * (dtype.itemsize if t["dtype"] in _FLOATING else _ITEMSIZE.get(t["dtype"], 4))
    return total


def load_tensors(files: Iterable[Path], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the files, read by safetensors straight onto `device` (checked first)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        read_header(f)
        try:
            out.update(load_file(f, device=str(device)))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{f} is not a readable safetensors file; download it again") from e
    return out

"""BuildOptions: everything a build takes beyond (model, out_dir, precisions, family, backend, force),
validated once and spelled one way (sorted, without duplicates), so the request hash sees one value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..buckets import MAX_REFERENCES
from ..calibration import CalibrationSpec
from ..errors import BuildError
from ..model.lora import LoraSpec
from . import quantize
from .export import DEFAULT_OPSET
from .tensorrt_build import TensorRTOptions

TORCH_DTYPES = ("bf16", "fp32")
DEFAULT_REFS: tuple[int, ...] = (0,)
DEFAULT_BATCHES: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class BuildOptions:
    """Everything beyond (model, out_dir, precisions, family, backend, force)."""

    opset: int = DEFAULT_OPSET
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    fp8_attention: bool = False
    recipes: Mapping[str, quantize.Recipe] | None = None  # overrides of quantize.RECIPES by name
    device: str | None = None  # where calibration and the reference run (torch); None: cuda if available
    dtype: str | None = None  # the torch components' dtype there (bf16 | fp32); None: bf16 on cuda, else fp32
    progress: bool = True
    refs: tuple[int, ...] = DEFAULT_REFS  # reference-image counts served (kontext build --refs 0,1)
    batches: tuple[int, ...] = DEFAULT_BATCHES  # batch sizes served (kontext build --batch 1,2,4)
    loras: tuple[LoraSpec, ...] = ()  # fused into the weights before export (kontext build --lora)

    def __post_init__(self) -> None:
        if not self.refs or any(not 0 <= r <= MAX_REFERENCES for r in self.refs):
            raise BuildError(f"--refs takes counts from 0 to {MAX_REFERENCES}, got {list(self.refs)}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise BuildError(f"--batch takes batch sizes >= 1, got {list(self.batches)}")
        # one spelling per request: sorted, without duplicates (the request hash sees this)
        object.__setattr__(self, "refs", tuple(sorted(set(self.refs))))
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))
        object.__setattr__(self, "loras", tuple(self.loras))
        if self.dtype is not None and self.dtype not in TORCH_DTYPES:
            raise BuildError(f"the build's torch dtype is {' or '.join(TORCH_DTYPES)}, got {self.dtype!r}")

    def resolved(self) -> BuildOptions:
        """device and dtype decided: a GPU when torch sees one, in bf16 (the real model's 24 GB, not 48
        in fp32 through host memory); else the CPU in fp32. build() calls it once."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or ("bf16" if device.startswith("cuda") else "fp32")
        return dataclasses.replace(self, device=device, dtype=dtype)

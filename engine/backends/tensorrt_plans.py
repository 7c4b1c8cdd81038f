"""The TensorRT runtime's pure logic, testable without TensorRT or a GPU.

Which (plan, profile) serves a call's shapes, the input shapes of a shape key, plan file names,
the device-memory block size, and the LRU accounting that keeps loaded plans under a budget.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..buckets import ShapeKey
from ..build.manifest import Artifact
from ..errors import ConfigError, ManifestError, ShapeNotServedError
from . import Signature, describe_keys, key_signature

BACKEND = "tensorrt"


@dataclass(frozen=True)
class Route:
    """Where one shape key runs: an artifact (plan path, relative to the build folder) and a profile."""

    artifact: str
    profile: int


def profile_table(artifacts: tuple[Artifact, ...]) -> dict[Signature, Route]:
    """(batch, image tokens, text tokens) -> Route over every TensorRT artifact of one precision.

    Keys sharing a signature share tensor shapes, so any of their profiles may serve; the first
    listed wins. A profile index outside 0..N-1 of its plan is a ManifestError.
    """
    table: dict[Signature, Route] = {}
    for a in artifacts:
        if a.backend != BACKEND:
            continue
        indices = sorted(set(a.profiles.values()))
        if indices and (indices[0] < 0 or indices[-1] >= len(a.profiles)):
            raise ManifestError(
                f"{a.path}: profile indices {indices} are not 0..{len(a.profiles) - 1}; "
                "rebuild with `kontext build --force`"
            )
        for key in sorted(a.shape_keys()):
            table.setdefault(key_signature(key), Route(a.path, a.profiles[str(key)]))
    return table


def route_for(table: dict[Signature, Route], sig: Signature, keys: frozenset[ShapeKey]) -> Route:
    try:
        return table[sig]
    except KeyError:
        raise ShapeNotServedError(
            f"no TensorRT profile serves (batch, image tokens, text tokens) = {sig}; "
            f"the plans serve {describe_keys(keys)}"
        ) from None


def input_shapes(
    key: ShapeKey, *, channels: int, text_dim: int, pooled_dim: int
) -> dict[str, tuple[int, ...]]:
    """The Denoiser inputs' shapes for one shape key (what set_input_shape receives)."""
    b, n, l = key.batch, key.image_tokens, key.text_tokens  # noqa: E741
    return {
        "hidden_states": (b, n, channels),
        "img_ids": (n, 3),
        "encoder_hidden_states": (b, l, text_dim),
        "txt_ids": (l, 3),
        "pooled_projections": (b, pooled_dim),
        "timestep": (b,),
        "guidance": (b,),
    }


def device_memory_block(sizes: dict[int, int]) -> int:
    """One block serves every profile's context of a worker: the largest profile's need, 256-byte aligned."""
    need = max(sizes.values(), default=0)
    return (need + 255) // 256 * 256


# ----------------------------------------------------------------------------- plan names

# engine/build/tensorrt_build.plan_name: transformer_<precision>_<family>_trt<version>_<gpu slug>.plan
_PLAN = re.compile(r"^transformer_(?P<precision>[a-z0-9]+)_(?P<family>[a-z0-9.]+)_trt(?P<trt>[a-z0-9.-]+)"
                   r"_(?P<gpu>[a-z0-9.-]+)\.plan$")  # fmt: skip


def slug(text: str) -> str:
    """How plan names spell a version or a GPU name: lower case, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class PlanName:
    """What a plan's file name says it was built for."""

    precision: str
    family: str
    trt_version: str  # slug
    gpu: str  # slug

    def mismatch(self, trt_version: str, gpu: str) -> str | None:
        """Why this plan cannot run under `trt_version` on `gpu` (None: the name says it can)."""
        if self.trt_version != slug(trt_version):
            return f"built with TensorRT {self.trt_version}, this machine has {trt_version}"
        if self.gpu != slug(gpu):
            return f"built for GPU {self.gpu}, this machine has {gpu}"
        return None


def parse_plan_name(name: str) -> PlanName | None:
    """The PlanName of a file name, or None when the name does not follow the convention."""
    m = _PLAN.match(Path(name).name)
    return None if m is None else PlanName(m["precision"], m["family"], m["trt"], m["gpu"])


# ----------------------------------------------------------------------------- LRU budget


class PlanBudget:
    """LRU accounting of loaded plans under a byte budget. Not thread-safe: its owner holds a lock.

    admit(name, size) says which loaded plans to free first; plans in use (pinned) are never
    chosen. A plan larger than the budget on its own is refused.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ConfigError(f"the plan memory budget must be positive, got {budget_bytes} bytes")
        self.budget = budget_bytes
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._pins: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(self._loaded.values())

    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def touch(self, name: str) -> None:
        self._loaded.move_to_end(name)

    def pin(self, name: str) -> None:
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        left = self._pins.get(name, 0) - 1
        if left > 0:
            self._pins[name] = left
        else:
            self._pins.pop(name, None)

    def admit(self, name: str, size: int) -> list[str]:
        """Plans to evict (least recently used, unpinned) so that `name` fits; records it as loaded."""
        if name in self._loaded:
            self.touch(name)
            return []
        if size > self.budget:
            raise ConfigError(
                f"plan {name} needs {size / 2**30:.1f} GiB, more than the plan memory budget "
                f"of {self.budget / 2**30:.1f} GiB; raise plan_memory_budget"
            )
        evict: list[str] = []
        free = self.budget - self.used
        for other, nbytes in self._loaded.items():
            if free >= size:
                break
            if self._pins.get(other):
                continue
            evict.append(other)
            free += nbytes
        if free < size:
            raise ConfigError(
                f"plan {name} ({size / 2**30:.1f} GiB) does not fit the budget: plans in use hold "
                f"{self.used / 2**30:.1f} of {self.budget / 2**30:.1f} GiB"
            )
        for other in evict:
            del self._loaded[other]
        self._loaded[name] = size
        return evict

    def forget(self, name: str) -> None:
        self._loaded.pop(name, None)
        self._pins.pop(name, None)

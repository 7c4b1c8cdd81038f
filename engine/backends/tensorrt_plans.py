"""TensorRT's pure logic, shared by the build and the runtime and testable without TensorRT or a GPU.

Whether TensorRT is here, which (plan, profile) serves a call's shapes, the profiles of a family
(static or dynamic) and their input shapes, plan file names, the device-memory block size, and the
LRU accounting that keeps loaded plans under a budget. Nothing here imports tensorrt at module level.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..buckets import MULTIPLE, ShapeKey, family_scale
from ..config import TransformerConfig
from ..errors import BackendUnavailableError, ConfigError, ManifestError, ShapeNotServedError
from ..manifest import PROFILE_MODES, Artifact
from . import Signature, describe_keys, key_signature
from .inputs import input_shapes

BACKEND = "tensorrt"

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


# ----------------------------------------------------------------------------- is TensorRT here


def tensorrt_module() -> ModuleType | None:
    """The real TensorRT module, or None. tensorrt-stubs (or tensorrt-lean) import without a Builder."""
    try:
        import tensorrt
    except ImportError:
        return None
    full = all(hasattr(tensorrt, n) for n in ("Builder", "Runtime", "__version__"))
    return tensorrt if full else None


def cuda_device(index: int = 0) -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of a CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), (major, minor)


def require_tensorrt() -> ModuleType:
    """TensorRT, after checking CUDA first: without a GPU, deserializing a plan segfaults."""
    if cuda_device() is None:
        raise BackendUnavailableError(
            "TensorRT needs a CUDA GPU, and torch sees none; use the onnxruntime backend "
            "(`kontext build --backend onnxruntime`) on this machine"
        )
    trt = tensorrt_module()
    if trt is None:
        raise BackendUnavailableError(
            "TensorRT is not installed (tensorrt-stubs alone does not count); "
            "`pip install -e '.[trt]'` on a GPU machine, or use the onnxruntime backend"
        )
    return trt


# ----------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """Where one shape key runs: an artifact (plan path, relative to the build folder) and a profile."""

    artifact: str
    profile: int


def profile_table(artifacts: Sequence[Artifact]) -> dict[Signature, Route]:
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


def route_for(table: Mapping[Signature, Route], sig: Signature, keys: frozenset[ShapeKey]) -> Route:
    try:
        return table[sig]
    except KeyError:
        raise ShapeNotServedError(
            f"no TensorRT profile serves (batch, image tokens, text tokens) = {sig}; "
            f"the plans serve {describe_keys(keys)}"
        ) from None


# ----------------------------------------------------------------------------- profiles


MAX_STATIC_PROFILES = 64  # more keys than this: --profiles dynamic (see family_profiles)


def family_profiles(keys: Sequence[ShapeKey] | frozenset[ShapeKey], mode: str) -> dict[str, int]:
    """Shape key string -> profile index (the manifest's `profiles`).

    static: one profile per key, in sorted key order, refused beyond MAX_STATIC_PROFILES keys (each
    profile is tuned and stored separately: build time and plan size grow with the count). dynamic: one
    profile (0) for every key; profile_shapes spans min..max of every dimension over all of them, batch
    and context tokens included.
    """
    if mode not in PROFILE_MODES:
        raise ConfigError(f"profiles must be one of {', '.join(PROFILE_MODES)}, got {mode!r}")
    ordered = sorted(keys)
    if mode == "static" and len(ordered) > MAX_STATIC_PROFILES:
        raise ConfigError(
            f"{len(ordered)} shape keys would be {len(ordered)} static TensorRT profiles (at most "
            f"{MAX_STATIC_PROFILES}: each is tuned and stored on its own); build them with --profiles "
            "dynamic (one profile spans every key), or fewer --refs / --batch values"
        )
    return {str(k): (i if mode == "static" else 0) for i, k in enumerate(ordered)}


def opt_key(keys: Sequence[ShapeKey], family: str) -> ShapeKey:
    """The key TensorRT tunes a dynamic profile for: the family's 1024x1024 bucket (scaled), or the
    key nearest to it in target tokens, then context tokens (no reference, where served), then the
    smallest batch: the single edit most requests are."""
    side = max(MULTIPLE, round(1024 * family_scale(family) / MULTIPLE) * MULTIPLE)
    square = (side // MULTIPLE) ** 2
    return min(
        keys, key=lambda k: (abs(k.target_tokens - square), abs(k.context_tokens - square), k.batch, k)
    )


def profile_shapes(cfg: TransformerConfig, keys: Sequence[ShapeKey], family: str) -> ProfileShapes:
    """(min, opt, max) of every input over the keys one profile serves (one key: min = opt = max)."""
    if not keys:
        raise ConfigError("a TensorRT profile needs at least one shape key")
    per_key = [input_shapes(cfg, k) for k in keys]
    opt = input_shapes(cfg, opt_key(keys, family))
    out: ProfileShapes = {}
    for name in opt:
        dims = [s[name] for s in per_key]
        lo = tuple(min(d[i] for d in dims) for i in range(len(opt[name])))
        hi = tuple(max(d[i] for d in dims) for i in range(len(opt[name])))
        out[name] = (lo, opt[name], hi)
    return out


def profile_mismatch(expected: ProfileShapes, actual: Mapping[str, Sequence[Iterable[int]]]) -> str | None:
    """Why a plan's profile (get_tensor_profile_shape per input) differs from the manifest's keys."""
    for name, want in expected.items():
        got = tuple(tuple(int(v) for v in dims) for dims in actual.get(name, ()))
        if got != want:
            return f"input {name}: the plan has (min, opt, max) {got}, the manifest's keys need {want}"
    return None


def device_memory_block(sizes: Mapping[int, int]) -> int:
    """One block serves every context of a worker: the largest profile's need, 256-byte aligned."""
    need = max(sizes.values(), default=0)
    return (need + 255) // 256 * 256


# ----------------------------------------------------------------------------- plan names

# plan_name: transformer_<precision>_<family>_trt<version>_<gpu slug>.plan
_PLAN = re.compile(
    r"^transformer_(?P<precision>[a-z0-9]+)_(?P<family>[a-z0-9.]+)_trt(?P<trt>[a-z0-9.-]+)"
    r"_(?P<gpu>[a-z0-9.-]+)\.plan$"
)


def slug(text: str) -> str:
    """How plan names spell a version or a GPU name: lower case, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def plan_name(precision: str, family: str, trt_version: str, gpu: str) -> str:
    """'transformer_fp8_1mp_trt10.13.0_nvidia-h100-80gb-hbm3.plan': what the plan is valid for."""
    return f"transformer_{precision}_{slug(family)}_trt{slug(trt_version)}_{slug(gpu)}.plan"


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

    def pinned(self, name: str) -> bool:
        return self._pins.get(name, 0) > 0

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

"""The Denoiser contract every backend implements (its inputs for a shape key: inputs.py).

A Denoiser is the transformer's forward and nothing else: the sampling loop, packing, ids
and schedule live once in sampling.py. Its argument names are the ONNX graph's input names.
runtime.load_artifacts picks the backend; each backend module has one loader.
Implementations and wrappers subclass `DenoiserBase`: they write `run(inputs)` over the named inputs,
not the seven arguments again.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..buckets import ShapeKey
from ..config import BACKENDS as BACKENDS  # config owns the names


@runtime_checkable
class Denoiser(Protocol):
    """Velocity of the rectified flow for the packed image tokens (target (+) context)."""

    name: str  # backend and precision, e.g. "torch-eager-fp32", "onnxruntime-int8"
    shape_keys: frozenset[ShapeKey] | None  # None: any shape

    def __call__(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, 64]
        img_ids: torch.Tensor,  # [N + M, 3]
        encoder_hidden_states: torch.Tensor,  # [B, L, D_txt]
        txt_ids: torch.Tensor,  # [L, 3]
        pooled_projections: torch.Tensor,  # [B, D_pooled]
        timestep: torch.Tensor,  # [B], sigma in [0, 1]
        guidance: torch.Tensor,  # [B] float32
    ) -> torch.Tensor:  # [B, N + M, 64]
        ...

    def close(self) -> None:
        """Free what the denoiser owns (sessions, plans, device memory). Idempotent; a no-op for most."""
        ...


@runtime_checkable
class GraphCapturing(Protocol):
    """A Denoiser that captures CUDA graphs, only when asked (KontextEngine.warmup, before serving):
    a capture synchronizes the device and must not run while other workers serve (TensorRT)."""

    def capture_graphs(self, key: ShapeKey) -> None: ...


DENOISER_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "img_ids",
    "encoder_hidden_states",
    "txt_ids",
    "pooled_projections",
    "timestep",
    "guidance",
)
DENOISER_OUTPUT = "velocity"

Signature = tuple[int, int, int]  # (batch, image tokens N + M, text tokens): what a call's tensors fix


def key_signature(key: ShapeKey) -> Signature:
    """The tensor shapes a shape key fixes. Keys differing only in the target/context split share one."""
    return (key.batch, key.image_tokens, key.text_tokens)


def call_signature(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Signature:
    """hidden_states [B, N + M, 64], encoder_hidden_states [B, L, D] -> (B, N + M, L). No device sync."""
    return (int(hidden_states.shape[0]), int(hidden_states.shape[1]), int(encoder_hidden_states.shape[1]))


def served_signatures(keys: frozenset[ShapeKey] | None) -> frozenset[Signature] | None:
    return None if keys is None else frozenset(key_signature(k) for k in keys)


def describe_keys(keys: frozenset[ShapeKey]) -> str:
    return ", ".join(str(k) for k in sorted(keys)) or "none"


def named_inputs(*tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Denoiser's positional arguments, in DENOISER_INPUTS order, as {ONNX input name: tensor}."""
    return dict(zip(DENOISER_INPUTS, tensors, strict=True))


class DenoiserBase:
    """The Denoiser's call written once: the seven arguments -> {DENOISER_INPUTS name: tensor} -> `run`.

    Subclasses set `name` (and `shape_keys` when they serve only some keys) and implement `run`; a
    wrapper calls its inner denoiser as `self.inner(**inputs)`. close() frees nothing unless overridden
    (a wrapper does not own what it wraps).
    """

    name: str
    shape_keys: frozenset[ShapeKey] | None = None  # None: any shape

    def __call__(
        self,
        hidden_states: torch.Tensor,  # [B, N + M, 64]
        img_ids: torch.Tensor,  # [N + M, 3]
        encoder_hidden_states: torch.Tensor,  # [B, L, D_txt]
        txt_ids: torch.Tensor,  # [L, 3]
        pooled_projections: torch.Tensor,  # [B, D_pooled]
        timestep: torch.Tensor,  # [B], sigma in [0, 1]
        guidance: torch.Tensor,  # [B] float32
    ) -> torch.Tensor:  # [B, N + M, 64]
        return self.run(
            named_inputs(
                hidden_states, img_ids, encoder_hidden_states, txt_ids, pooled_projections, timestep, guidance
            )
        )

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # DENOISER_INPUTS -> [B, N + M, 64]
        raise NotImplementedError(f"{type(self).__name__} must implement run(inputs)")

    def close(self) -> None:
        """Nothing to free."""

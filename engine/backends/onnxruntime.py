"""ONNX Runtime backend: one InferenceSession over a built artifact, torch tensors bound by I/O binding.

Thread safety: InferenceSession.run is thread-safe; each call makes its own IOBinding and output
tensor, so any number of threads may call one OrtDenoiser at once. The session's intra-op thread
pool is shared by those calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..buckets import ShapeKey
from ..config import LoadOptions
from ..errors import BackendUnavailableError, ShapeNotServedError
from ..manifest import Artifact, MachineFacts, Manifest, check_manifest, select_artifact
from . import DENOISER_INPUTS, DENOISER_OUTPUT, DenoiserBase, call_signature, describe_keys, served_signatures

log = logging.getLogger(__name__)

BACKEND = "onnxruntime"

# ONNX tensor type -> (torch dtype, numpy dtype for IOBinding). bfloat16 has no numpy dtype.
_TYPES: dict[str, tuple[torch.dtype, Any]] = {
    "tensor(float)": (torch.float32, np.float32),
    "tensor(float16)": (torch.float16, np.float16),
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            "onnxruntime is not installed; `pip install onnxruntime` (or onnxruntime-gpu on a CUDA machine)"
        ) from e
    return onnxruntime


def ort_version() -> str:
    return str(_ort().__version__)


class OrtDenoiser(DenoiserBase):
    """A Denoiser over one ONNX Runtime model. Serves `shape_keys` only (None: any shape)."""

    def __init__(
        self,
        model_path: Path,
        *,
        name: str = "onnxruntime",
        shape_keys: frozenset[ShapeKey] | None = None,
        threads: int | None = None,
        device: str = "cpu",
        runtime_options: Mapping[str, Any] | None = None,
    ) -> None:
        """runtime_options: the manifest artifact's (graph_optimization_level, providers,
        disabled_optimizers): an artifact is loaded exactly as the build verified it."""
        ort = _ort()
        ro = dict(runtime_options or {})
        self.name = name
        self.shape_keys = shape_keys
        self._signatures = served_signatures(shape_keys)
        self.device = torch.device(device)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = ro.get("graph_optimization_level", "ORT_ENABLE_EXTENDED")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.log_severity_level = 3
        # Idle worker threads would otherwise spin for a while after each call and take the cores
        # from the torch VAE / text encoders that run next in the same process (seen in the benchmark:
        # VAE decode 2x slower right after ONNX Runtime steps).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "this onnxruntime has no CUDA provider; install onnxruntime-gpu, "
                    "or load with device='cpu'"
                )
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        else:
            providers = list(ro.get("providers", ["CPUExecutionProvider"]))
        disabled = list(ro.get("disabled_optimizers") or []) or None
        self.session = ort.InferenceSession(
            str(model_path), sess_options=opts, providers=providers, disabled_optimizers=disabled
        )
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.type for o in self.session.get_outputs()}
        if set(inputs) != set(DENOISER_INPUTS) or DENOISER_OUTPUT not in outputs:
            raise BackendUnavailableError(
                f"{model_path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"expected {list(DENOISER_INPUTS)} -> {DENOISER_OUTPUT!r}. Rebuild it "
                "with `kontext build --force`"
            )
        self._in_types = {k: self._dtype(v) for k, v in inputs.items()}
        self._out_type = self._dtype(outputs[DENOISER_OUTPUT])
        log.info("loaded %s (%s, %s threads)", model_path, name, threads or "default")

    @staticmethod
    def _dtype(onnx_type: str) -> tuple[torch.dtype, Any]:
        try:
            return _TYPES[onnx_type]
        except KeyError:
            raise BackendUnavailableError(
                f"ONNX type {onnx_type} cannot be bound from torch tensors"
            ) from None

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # DENOISER_INPUTS -> [B, N + M, 64]
        hidden_states = inputs["hidden_states"]  # [B, N + M, 64]
        sig = call_signature(hidden_states, inputs["encoder_hidden_states"])
        if self._signatures is not None and sig not in self._signatures:
            raise ShapeNotServedError(
                f"{self.name} was asked for (batch, image tokens, text tokens) = {sig}, "
                f"which none of its shape keys has ({describe_keys(self.shape_keys or frozenset())})"
            )
        dev_type = "cuda" if self.device.type == "cuda" else "cpu"
        dev_id = self.device.index or 0
        binding = self.session.io_binding()
        keep: list[torch.Tensor] = []  # inputs converted here stay alive until the run ends
        for name, t in inputs.items():
            tdt, ndt = self._in_types[name]
            t = t.to(device=self.device, dtype=tdt).contiguous()
            keep.append(t)
            binding.bind_input(name, dev_type, dev_id, ndt, tuple(t.shape), t.data_ptr())
        out_t, out_n = self._out_type
        out = torch.empty(tuple(hidden_states.shape), dtype=out_t, device=self.device)
        binding.bind_output(DENOISER_OUTPUT, dev_type, dev_id, out_n, tuple(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def close(self) -> None:
        self.__dict__.pop("session", None)


def load_onnxruntime(
    manifest: Manifest, build_dir: Path, *, weights_id: str, options: LoadOptions
) -> OrtDenoiser:
    """The manifest's ONNX Runtime artifact of `precision`, checked against the manifest, as a Denoiser."""
    artifact = select_artifact(manifest, build_dir, BACKEND, options.precision)
    machine = MachineFacts(weights_id=weights_id, backend_version=ort_version())
    path = check_manifest(manifest, build_dir, artifact, machine)
    return ort_denoiser(artifact, path, options)


def ort_denoiser(artifact: Artifact, path: Path, options: LoadOptions) -> OrtDenoiser:
    """The Denoiser over one artifact at `path`, under its recorded session options: what
    load_onnxruntime returns once the manifest is checked, and what the build verifies."""
    return OrtDenoiser(
        path,
        name=f"{BACKEND}-{artifact.precision}",
        shape_keys=artifact.shape_keys(),
        threads=options.threads,
        device=options.device or "cpu",
        runtime_options=artifact.runtime_options,
    )

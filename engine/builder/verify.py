"""Verify stage: run an artifact through the runtime's own Denoiser on every shape key it serves, and
compare with the fp32 torch transformer.

The Denoiser is made by the function `engine.load`'s loader calls for that artifact
(onnxruntime.ort_denoiser: OrtDenoiser under the manifest's session options; tensorrt.trt_denoiser:
TrtDenoiser with its contexts, shared device memory and CUDA graphs), so "verified" means the runtime
path was verified, not only the graph. The inputs and golden velocities come
from the sampling loop (calibrate.capture_golden). Errors: relative L2 over all samples of a key
(engine.metrics.rel_l2), and max abs. Exceeding the recipe's bound fails the build.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backends import DENOISER_INPUTS, DENOISER_OUTPUT, Denoiser, GraphCapturing
from ..config import LoadOptions, TransformerConfig
from ..errors import VerificationError
from ..manifest import Artifact, Verification, parse_shape_key
from ..metrics import rel_l2
from .calibrate import Sample

log = logging.getLogger(__name__)


def artifact_denoiser(
    root: Path, artifact: Artifact, cfg: TransformerConfig, device: str = "cuda"
) -> Denoiser:
    """The runtime's Denoiser over one just-built artifact, made by its backend's own function, the one
    its loader calls once the manifest is checked (device: TensorRT's CUDA device)."""
    path = root / artifact.path
    if artifact.backend == "onnxruntime":
        from ..backends.onnxruntime import ort_denoiser

        return ort_denoiser(artifact, path, LoadOptions(backend="onnxruntime", device="cpu"))
    from ..backends.tensorrt import trt_denoiser

    return trt_denoiser([(artifact, path)], cfg, LoadOptions(backend="tensorrt", device=device))


def verify(
    denoiser: Denoiser,
    golden: Mapping[str, Sequence[Sample]],
    keys: Sequence[str],
    bound: float,
    label: str,
    progress: bool = True,
) -> dict[str, Verification]:
    """Verification per shape key; the caller raises (check) once the results are recorded."""
    out: dict[str, Verification] = {}
    for key in tqdm(keys, desc=f"verify {label}", unit="key", leave=False, disable=not progress):
        samples = golden.get(key)
        if not samples:
            raise VerificationError(f"no captured inputs for shape key {key}; rebuild with --force")
        if isinstance(denoiser, GraphCapturing):
            denoiser.capture_graphs(parse_shape_key(key))  # verify the graph replays that serve
        outs = np.stack([_run(denoiser, s) for s in samples])  # [S, B, N + M, C]
        refs = np.stack([s[DENOISER_OUTPUT] for s in samples]).astype(np.float64)
        rel, mx = rel_l2(outs, refs), float(np.abs(outs - refs).max())
        out[key] = Verification(rel_l2=rel, max_abs=mx, bound=bound, samples=len(samples))
        log.debug("verify %s %s: rel L2 %.2e, max abs %.2e (bound %.1e)", label, key, rel, mx, bound)
    return out


def _run(denoiser: Denoiser, sample: Sample) -> np.ndarray:
    inputs = {n: torch.from_numpy(np.asarray(sample[n])) for n in DENOISER_INPUTS}
    with torch.inference_mode():
        return denoiser(**inputs).to("cpu", torch.float64).numpy()


def check(results: Mapping[str, Verification], label: str) -> None:
    bad = {k: v for k, v in results.items() if not v.rel_l2 <= v.bound}
    if bad:
        worst = ", ".join(f"{k}: {v.rel_l2:.3e} > {v.bound:.1e}" for k, v in sorted(bad.items()))
        raise VerificationError(
            f"{label} differs from the fp32 torch transformer beyond its bound ({worst}); "
            "try another recipe (e.g. --precision fp32), more calibration (--calib-edits), "
            "or rebuild with --force if the files were changed"
        )

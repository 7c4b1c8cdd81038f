"""Verify stage: run an artifact on every shape key it serves and compare with the fp32 torch transformer.

The inputs and reference velocities come from the sampling loop (calibrate.capture_reference).
Errors: relative L2 over all samples of a key, and max abs. Exceeding the recipe's bound fails the build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..backends import DENOISER_INPUTS, DENOISER_OUTPUT
from ..errors import VerificationError
from .calibrate import Sample
from .manifest import Verification

log = logging.getLogger(__name__)

RunFn = Callable[[str, dict[str, np.ndarray]], np.ndarray]  # (shape key, inputs) -> velocity


def errors(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> tuple[float, float]:
    """(relative L2, max abs) of outputs vs references, over all samples together."""
    diff = np.concatenate(
        [(o.astype(np.float64) - r).ravel() for o, r in zip(outputs, references, strict=True)]
    )
    ref = np.concatenate([r.astype(np.float64).ravel() for r in references])
    return float(np.linalg.norm(diff)) / max(float(np.linalg.norm(ref)), 1e-30), float(np.abs(diff).max())


def verify(
    run: RunFn, reference: Mapping[str, Sequence[Sample]], keys: Sequence[str], bound: float, label: str
) -> dict[str, Verification]:
    """Verification per shape key; raises VerificationError naming every key over `bound`."""
    out: dict[str, Verification] = {}
    for key in tqdm(keys, desc=f"verify {label}", unit="key", leave=False):
        samples = reference.get(key)
        if not samples:
            raise VerificationError(f"no captured inputs for shape key {key}; rebuild with --force")
        outs = [run(key, {n: s[n] for n in DENOISER_INPUTS}) for s in samples]
        rel, mx = errors(outs, [s[DENOISER_OUTPUT] for s in samples])
        out[key] = Verification(rel_l2=rel, max_abs=mx, bound=bound, samples=len(samples))
        log.debug("verify %s %s: rel L2 %.2e, max abs %.2e (bound %.1e)", label, key, rel, mx, bound)
    return out


def check(results: Mapping[str, Verification], label: str) -> None:
    bad = {k: v for k, v in results.items() if not v.rel_l2 <= v.bound}
    if bad:
        worst = ", ".join(f"{k}: {v.rel_l2:.3e} > {v.bound:.1e}" for k, v in sorted(bad.items()))
        raise VerificationError(
            f"{label} differs from the fp32 torch transformer beyond its bound ({worst}); "
            "try another recipe (e.g. --precision fp32), more calibration (--calib-samples), "
            "or rebuild with --force if the files were changed"
        )


def ort_runner(path: Path, runtime_options: dict[str, Any]) -> RunFn:
    from .compile import ort_session

    session = ort_session(path, runtime_options)

    def run(key: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run([DENOISER_OUTPUT], inputs)[0])

    return run


def tensorrt_runner(path: Path, profiles: Mapping[str, int]) -> RunFn:
    from .tensorrt_build import PlanRunner

    runner = PlanRunner(path)

    def run(key: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return runner.run(profiles[key], inputs)

    return run

"""Quiet by default: the known third-party noise lines (engine/noise.py) are dropped for Python API
users, CLI users and context-parallel workers alike (they all import `engine`), only those lines, and
-v (noise.show) lets them through. Each import runs in a fresh interpreter; the bare import of torchao
is the negative control that shows the noise is there to drop on this machine."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from engine import noise

TORCHAO_NOISE = "Failed to load"  # torchao's missing CUDA kernels (no CUDA here)
PYTREE_NOISE = "is an Enum subclass and is now natively supported"


def stderr_of(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_importing_engine_drops_torchaos_noise_and_show_lets_it_through() -> None:
    bare = stderr_of("import torchao")
    if TORCHAO_NOISE not in bare:
        pytest.skip("torchao loads its CUDA kernels on this machine: no noise to drop")
    assert PYTREE_NOISE in bare  # the control: both lines are printed without engine
    quiet = stderr_of("import engine, torchao")
    assert TORCHAO_NOISE not in quiet and PYTREE_NOISE not in quiet, quiet
    shown = stderr_of("import engine, engine.noise; engine.noise.show(True); import torchao")
    assert TORCHAO_NOISE in shown and PYTREE_NOISE in shown


def test_only_the_known_lines_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    noise.install()
    noise.install()  # idempotent: one filter per logger
    torchao = logging.getLogger("torchao")
    assert sum(isinstance(f, noise._KnownNoise) for f in torchao.filters) == 1
    modeling = logging.getLogger("diffusers.models.modeling_utils")
    empty = "There are modules in FluxTransformer2DModel that should be kept in float32: []. Casting ..."
    listed = "There are modules in X that should be kept in float32: ['norm']. Casting ..."
    # the loggers' own levels too: a CLI run in this process (quiet_third_party) sets them to ERROR
    with caplog.at_level(logging.WARNING, "torchao"), caplog.at_level(logging.WARNING, modeling.name):
        torchao.warning("Failed to load /x/_C_cutlass_90a.abi3.so: no CUDA")
        torchao.warning("torchao: something about your input")
        modeling.warning(empty)
        modeling.warning(listed)
    assert [r.getMessage() for r in caplog.records] == ["torchao: something about your input", listed]
    caplog.clear()
    try:
        noise.show(True)
        with caplog.at_level(logging.WARNING, "torchao"):
            torchao.warning("Failed to load /x/_C_cutlass_90a.abi3.so: no CUDA")
        assert len(caplog.records) == 1
    finally:
        noise.show(False)

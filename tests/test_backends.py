"""Backends behind the Denoiser contract: ONNX Runtime parity with torch eager, the int8 bound, the
manifest checks that refuse a build, and the torch modes' logic (FP8 needs a GPU of cc >= 8.9).

Bounds. fp32: the same math as torch (per-forward rel L2 ~5e-6 at build verification), so the final
image must be within PSNR 40 dB (measured 88-95 dB) and the final latents within 1e-4 relative L2.
int8: the build verifies each forward within rel L2 0.08 (measured 1.5-1.8%); an Euler flow sums
those errors with weights dt (sum 1), so the final latents' error is bounded by that scale. On the
tiny model we measured final latents 1e-3 relative L2 and images 62-64 dB PSNR (8 and 28 steps, four
buckets); the bounds below (1e-2 and 35 dB, i.e. RMS <= 4.5 of 255 levels) keep a 10x margin and
still fail a broken quantization (wrong scales give errors of 10-100%).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from engine.backends.fp8 import FP8_KEEP, fp8_filter, fp8_supported, quantize_fp8
from engine.backends.inputs import dummy_inputs
from engine.backends.onnxruntime import OrtDenoiser, load_onnxruntime, ort_version
from engine.backends.torch import TorchDenoiser, default_dtype, torch_denoiser
from engine.buckets import ShapeKey
from engine.config import PRESETS, LoadOptions
from engine.errors import BackendUnavailableError, ConfigError, ManifestError, ShapeNotServedError
from engine.manifest import (
    MachineFacts,
    check_manifest,
    read_manifest,
    rebuild_command,
    select_artifact,
    write_manifest,
)
from engine.runtime import load

from .conftest import gradient_image

PROMPT = "add a red hat"
BUCKETS = [(128, 128), (80, 192)]
STEPS = 4
FP32_PSNR, FP32_REL = 40.0, 1e-4
INT8_PSNR, INT8_REL = 35.0, 1e-2


def psnr(a, b) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def reference(tiny):
    """torch eager results of the same edits (the parity reference)."""
    with load("tiny") as eager:
        return {s: eager.edit(gradient_image(*s), PROMPT, seed=3, steps=STEPS) for s in BUCKETS}


@pytest.mark.parametrize("size", BUCKETS, ids=["square", "portrait"])
def test_onnxruntime_fp32_and_int8_within_bounds(tiny_build, reference, size):
    ref = reference[size]
    out = {}
    for precision in ("fp32", "int8"):
        with load(tiny_build, precision=precision, threads=1) as kontext:
            assert kontext.name == f"onnxruntime-{precision}"
            out[precision] = kontext.edit(gradient_image(*size), PROMPT, seed=3, steps=STEPS)
    assert psnr(out["fp32"].image, ref.image) >= FP32_PSNR
    assert rel(out["fp32"].latents, ref.latents) <= FP32_REL
    assert psnr(out["int8"].image, ref.image) >= INT8_PSNR
    assert rel(out["int8"].latents, ref.latents) <= INT8_REL
    assert rel(out["int8"].latents, out["fp32"].latents) > 1e-5  # the int8 artifact really is quantized


def _inputs(image_tokens: int, text_tokens: int = 32) -> dict[str, torch.Tensor]:
    key = ShapeKey(1, image_tokens // 2, image_tokens - image_tokens // 2, text_tokens)
    return dummy_inputs(PRESETS["tiny"].transformer, key)


def test_ort_denoiser_serves_only_manifest_keys_and_sets_threads(tiny, tiny_build):
    m = read_manifest(tiny_build)
    d = load_onnxruntime(
        m, tiny_build, weights_id=tiny.weights_id, options=LoadOptions(precision="fp32", threads=1)
    )
    assert d.session.get_session_options().intra_op_num_threads == 1
    x = _inputs(128)  # b1_t64_c64_x32
    eager = TorchDenoiser(tiny.transformer)(**x)
    assert rel(d(**x), eager) < 1e-4
    with pytest.raises(ShapeNotServedError, match="b1_t64_c64_x32"):
        d(**_inputs(200))  # 100 + 100 tokens: no key of the tiny family
    unrestricted = OrtDenoiser(tiny_build / select_artifact(m, tiny_build, "onnxruntime", "fp32").path)
    assert unrestricted(**_inputs(200)).shape == (1, 200, 64)


# ----------------------------------------------------------------------------- manifest refusals


@pytest.fixture()
def build_copy(tiny_build, tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(tiny_build, dst)
    return dst


def _refused(build_dir, weights_id, match):
    with pytest.raises(ManifestError, match=match) as e:
        load_onnxruntime(
            read_manifest(build_dir), build_dir, weights_id=weights_id, options=LoadOptions(precision="fp32")
        )
    assert "kontext build --model tiny" in str(e.value) and "--force" in str(e.value)


def test_refuses_other_weights(tiny, build_copy):
    m = read_manifest(build_copy)
    write_manifest(build_copy, dataclasses.replace(m, weights_id="0123456789abcdef"))
    _refused(build_copy, tiny.weights_id, "built from weights 0123456789abcdef")
    with pytest.raises(ManifestError, match="rebuild with `kontext build"):
        load(build_copy)  # through the public API too


def test_refuses_other_backend_version(tiny, build_copy):
    m = read_manifest(build_copy)
    write_manifest(build_copy, dataclasses.replace(m, backend_version="0.0.1"))
    _refused(build_copy, tiny.weights_id, f"onnxruntime 0.0.1, but this machine has {ort_version()}")


def test_refuses_missing_file(tiny, build_copy):
    m = read_manifest(build_copy)
    (build_copy / select_artifact(m, build_copy, "onnxruntime", "fp32").path).unlink()
    _refused(build_copy, tiny.weights_id, "missing")


def test_refuses_corrupted_file(tiny, build_copy):
    path = build_copy / select_artifact(read_manifest(build_copy), build_copy, "onnxruntime", "fp32").path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the sha256 tells
    path.write_bytes(bytes(data))
    _refused(build_copy, tiny.weights_id, "sha256")
    path.write_bytes(bytes(data[:-10]))  # truncated: the size tells
    _refused(build_copy, tiny.weights_id, "bytes")


def test_refuses_gpu_mismatch_and_unfinished_builds(tiny, tiny_build):
    m = read_manifest(tiny_build)
    art = select_artifact(m, tiny_build, "onnxruntime", "fp32")
    on_gpu = dataclasses.replace(m, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    facts = MachineFacts(tiny.weights_id, m.backend_version)
    with pytest.raises(ManifestError, match="no CUDA GPU"):
        check_manifest(on_gpu, tiny_build, art, facts)
    other = dataclasses.replace(facts, gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    with pytest.raises(ManifestError, match="this GPU is NVIDIA A100"):
        check_manifest(on_gpu, tiny_build, art, other)
    with pytest.raises(ManifestError, match="unfinished"):
        check_manifest(dataclasses.replace(m, complete=False), tiny_build, art, facts)
    with pytest.raises(ManifestError, match="no bf16 artifact"):
        select_artifact(m, tiny_build, "onnxruntime", "bf16")
    assert rebuild_command(m, tiny_build, "int8").startswith("kontext build --model tiny --precision int8")


# ----------------------------------------------------------------------------- torch modes


def test_torch_modes_logic(tiny):
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda") == torch.bfloat16
    assert fp8_supported((8, 9)) and fp8_supported((9, 0)) and fp8_supported((10, 0))
    assert not fp8_supported((8, 6)) and not fp8_supported((8, 0)) and not fp8_supported(None)
    chosen = [n for n, m in tiny.transformer.named_modules() if fp8_filter(m, n)]
    assert chosen and all(isinstance(tiny.transformer.get_submodule(n), torch.nn.Linear) for n in chosen)
    assert not any(n.split(".")[0] in FP8_KEEP for n in chosen)  # the top-level modules only:
    assert "single_transformer_blocks.0.proj_out" in chosen  # a block's proj_out is quantized
    assert any(n.startswith("transformer_blocks.0.attn") for n in chosen)
    with pytest.raises(BackendUnavailableError, match=r"compute capability >= 8\.9"):
        quantize_fp8(tiny.transformer, torch.device("cpu"))
    with pytest.raises(ConfigError, match="torch mode"):
        torch_denoiser(tiny.transformer, mode="turbo")
    d = torch_denoiser(tiny.transformer, mode="eager", device="cpu")
    assert d.name == "torch-eager-fp32" and d.shape_keys is None
    c = torch_denoiser(tiny.transformer, mode="compile", device="cpu")  # compiled lazily: not called here
    assert c.name == "torch-compile-fp32"
    assert all(b._compiled_call_impl is not None for b in c.transformer.transformer_blocks)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA device"):
            torch_denoiser(tiny.transformer, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["eager", "compile", "fp8"])
def test_torch_modes_on_gpu(mode):
    from engine.model.load import load_components

    comps = load_components("tiny")
    ref = TorchDenoiser(comps.transformer)(**_inputs(128))
    cap = torch.cuda.get_device_capability()
    if mode == "fp8" and not fp8_supported(cap):
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU has {cap}")
    d = torch_denoiser(comps.transformer, mode=mode, device="cuda")
    x = {
        k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "guidance" else v.dtype)
        for k, v in _inputs(128).items()
    }
    out = d(**x).float().cpu()
    assert rel(out, ref) < (0.15 if mode == "fp8" else 0.05)


@pytest.mark.slow  # torch.compile on two CPU cores: ~30 s
@pytest.mark.parametrize("freeze", [False, True], ids=["plain", "freeze"])
def test_regional_compile_matches_eager_and_leaves_the_model_eager(tiny, freeze):
    """compile_blocks compiles each block of a view (with inductor freezing too: weights folded in as
    constants); the shared eager transformer stays eager."""
    from engine.backends.torch import compile_blocks

    view = compile_blocks(tiny.transformer, freeze=freeze)
    originals = [*tiny.transformer.transformer_blocks, *tiny.transformer.single_transformer_blocks]
    assert all(b._compiled_call_impl is None for b in originals)
    assert (
        view.transformer_blocks[0].attn.to_q.weight is tiny.transformer.transformer_blocks[0].attn.to_q.weight
    )
    x = _inputs(128)
    ref = TorchDenoiser(tiny.transformer)(**x)
    out = TorchDenoiser(view)(**x)
    assert rel(out, ref) < 1e-5
    assert torch.equal(TorchDenoiser(tiny.transformer)(**x), ref)  # the original still runs eagerly


def test_freezing_keeps_the_compile_mode_and_is_refused_in_eager():
    from engine.backends.torch import compile_kwargs
    from engine.backends.torch_options import check_options, parse_levers

    assert compile_kwargs("default", False) == {"mode": "default"}
    assert compile_kwargs("default", True) == {"options": {"freezing": True}}
    tuned = compile_kwargs("max-autotune-no-cudagraphs", True)["options"]
    assert tuned["freezing"] is True and tuned["max_autotune"] is True
    assert parse_levers("freeze").freeze and parse_levers("freeze").levers == ("freeze",)
    with pytest.raises(ConfigError, match="freeze"):
        check_options("eager", parse_levers("freeze"))

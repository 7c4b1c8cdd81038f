"""The embeddable API: load -> edit / warmup / close, and its thread-safety model (a pool of workers,
each with its own tokenizers; the denoiser shared): 8 threads editing concurrently through one engine
give exactly the results of the same requests run one by one."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import pytest
import torch

import engine
from engine.backends import DenoiserBase
from engine.buckets import ShapeKey, family_shape_keys
from engine.config import LoadOptions
from engine.dispatch import Dispatcher
from engine.errors import BackendUnavailableError, ConfigError
from engine.images import read_png_metadata
from engine.loading import default_steps
from engine.outputs import OutputWriter
from engine.request import EditRequest
from engine.runtime import KontextEngine

from .conftest import gradient_image

REQUESTS = [  # (image size, prompt, seed, output size): several buckets, prompts and seeds
    ((128, 128), "add a red hat", 0, None),
    ((80, 192), "make it night", 1, None),
    ((192, 80), "turn the sky purple", 2, None),
    ((112, 144), "add snow", 3, None),
    ((128, 128), "remove the tree", 4, (128, 128)),  # explicit size, same bucket
    ((160, 96), "paint it in watercolor", 5, None),
    ((96, 176), "add a cat", 6, None),
    ((128, 128), "add a red hat", 7, None),
]


def _edit(kontext, req):
    size, prompt, seed, out = req
    return kontext.edit(gradient_image(*size, seed=seed), prompt, seed=seed, steps=2, size=out)


def test_concurrent_edits_equal_sequential(tiny_build):
    with engine.load(tiny_build, precision="fp32", workers=4, threads=1) as kontext:
        sequential = [_edit(kontext, r) for r in REQUESTS]
        with ThreadPoolExecutor(max_workers=8) as pool:
            concurrent = list(pool.map(lambda r: _edit(kontext, r), REQUESTS))
        assert kontext.stats().hits == 2 * len(REQUESTS)
    for s, c in zip(sequential, concurrent, strict=True):
        assert torch.equal(s.latents, c.latents)
        assert s.image.tobytes() == c.image.tobytes()
    assert len({r.latents.shape for r in sequential}) > 1  # really different requests


def test_edit_result_warmup_and_close(tiny_build):
    kontext = engine.load(tiny_build)  # default: the first artifact listed (fp32)
    assert isinstance(kontext, engine.KontextEngine) and kontext.name == "onnxruntime-fp32"
    assert (128, 128) in kontext.buckets()
    times = kontext.warmup()
    assert set(times) == {str(k) for k in kontext.shape_keys or ()}
    r = kontext.edit(gradient_image(100, 100), "add a hat", seed=0, steps=2)
    assert r.image.size == (128, 128) and r.size == (128, 128)
    assert {"text_encode", "vae_encode", "denoise", "vae_decode", "total", "worker_wait"} <= set(r.timings)
    kontext.close()
    kontext.close()  # idempotent
    with pytest.raises(BackendUnavailableError, match="closed"):
        kontext.edit(gradient_image(100, 100), "add a hat")


def test_load_arguments(tiny_build):
    with pytest.raises(ConfigError, match="build folder"):
        engine.load("tiny", backend="onnxruntime")
    with pytest.raises(ConfigError, match="backend must be"):
        engine.load("tiny", backend="tvm")
    with pytest.raises(ConfigError, match="workers"):
        engine.load(tiny_build, workers=0)
    with pytest.raises(BackendUnavailableError) if not torch.cuda.is_available() else nullcontext():
        engine.load(tiny_build, backend="tensorrt")  # CUDA checked before TensorRT is touched


def test_load_options_or_keywords(tiny_build):
    with engine.load(tiny_build, options=LoadOptions(precision="int8", threads=1)) as kontext:
        assert kontext.name == "onnxruntime-int8"
    with pytest.raises(ConfigError, match="either"):
        engine.load(tiny_build, options=LoadOptions(), precision="int8")
    with pytest.raises(ConfigError, match="miss_policy"):
        engine.load(tiny_build, miss_policy="ignore")


class _Capturing(DenoiserBase):
    """A denoiser that captures CUDA graphs (as TensorRT's does): warmup must ask it, key by key."""

    name, shape_keys = "capturing", frozenset(family_shape_keys("tiny", 32))

    def __init__(self) -> None:
        self.captured: list[ShapeKey] = []

    def run(self, inputs):
        raise AssertionError("warmup must capture, not call")

    def capture_graphs(self, key: ShapeKey) -> None:
        self.captured.append(key)


def test_warmup_captures_graphs_of_every_key(tiny):
    d = _Capturing()
    kontext = KontextEngine(tiny, Dispatcher(d, family="tiny"), device="cpu", dtype=torch.float32)
    assert set(kontext.warmup()) == {str(k) for k in d.shape_keys}
    assert sorted(d.captured) == sorted(d.shape_keys)


def test_import_is_light():
    code = "import sys, engine; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_edit_takes_an_edit_request_or_its_keywords(tiny_engine):
    """engine.edit(EditRequest) (the server's form) and engine.edit(image, prompt, **knobs) are one edit;
    steps None is the engine's default_steps; mixing both forms is refused."""
    image = gradient_image(100, 100)
    request = EditRequest(image, "add a hat", steps=2, seed=4, guidance=3.0)
    a = tiny_engine.edit(request)
    b = tiny_engine.edit(image, "add a hat", steps=2, seed=4, guidance=3.0)
    assert torch.equal(a.latents, b.latents) and a.request == b.request == request
    assert tiny_engine.default_steps == default_steps("tiny") == 8
    defaulted = tiny_engine.edit(EditRequest(image, "add a hat"))
    assert defaulted.request is not None and defaulted.request.steps == len(defaulted.step_times) == 8
    with pytest.raises(ConfigError, match="not both"):
        tiny_engine.edit(request, seed=1)
    with pytest.raises(ConfigError, match="needs a prompt"):
        tiny_engine.edit(image)


def test_outputs_carry_the_request_and_never_a_path(tiny_engine, tmp_path):
    result = tiny_engine.edit(gradient_image(100, 100), "add a hat", steps=1, seed=3, guidance=3.0)
    meta = tiny_engine.outputs.metadata(result, source=tmp_path / "in.png")
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["guidance"]) == ("add a hat", "3", "1", "3.0")
    assert meta["source_image"] == "in.png" and meta["model"] == "tiny" and "engine" not in meta
    built = OutputWriter("tiny", "w", build="tiny-fp32")  # an engine from build/tiny-fp32
    (tmp_path / "served.png").write_bytes(built.encode(result))  # the server's bytes: no prompt unless asked
    served = read_png_metadata(tmp_path / "served.png")
    assert served["engine"] == "tiny-fp32" and "prompt" not in served and str(tmp_path) not in str(served)


def test_dtype_sets_the_torch_path_and_is_refused_for_a_build(tiny_build):
    """--dtype bf16 on a CPU (fast with AMX): the weights and the pipeline run in bf16, and the edit stays
    close to fp32's; a built engine keeps its own precision and refuses the option in one line."""
    image = gradient_image(128, 96)
    with engine.load("tiny") as fp32, engine.load("tiny", dtype="bf16") as bf16:
        assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
        assert next(bf16.components.transformer.parameters()).dtype == torch.bfloat16
        a = fp32.edit(image, "x", steps=2).latents
        b = bf16.edit(image, "x", steps=2).latents.float()
    err = float((a - b).norm() / a.norm())
    assert 0 < err < 0.1  # bf16 differs, but by rounding, not by a broken path
    with pytest.raises(ConfigError, match="a onnxruntime build has its own"):
        engine.load(tiny_build, dtype="bf16")
    with pytest.raises(ConfigError, match="dtype must be one of fp32, bf16"):
        engine.load("tiny", dtype="fp16")


def test_edit_resolves_steps_and_key_once_and_reports_the_dispatched_key(tiny_engine, monkeypatch):
    """KontextEngine.edit decides the steps and the shape key once (pipeline.plan_edit) and passes them
    down: the pipeline neither fills the steps again nor recomputes the key, and the result reports the
    key the dispatcher chose the denoiser for. Its pipelines are made at load, one per worker."""
    import engine.pipeline as pipeline_module

    calls = {"resolved": 0, "shape_key": 0, "pipelines": 0}
    resolved, shape_key, init = (
        EditRequest.resolved,
        EditRequest.shape_key,
        pipeline_module.KontextPipeline.__init__,
    )

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(EditRequest, "resolved", counted("resolved", resolved))
    monkeypatch.setattr(EditRequest, "shape_key", counted("shape_key", shape_key))
    monkeypatch.setattr(pipeline_module.KontextPipeline, "__init__", counted("pipelines", init))
    dispatched: list[ShapeKey] = []
    resolve = tiny_engine.dispatcher.resolve
    monkeypatch.setattr(tiny_engine.dispatcher, "resolve", lambda key: dispatched.append(key) or resolve(key))

    result = tiny_engine.edit(gradient_image(100, 100), "add a hat", num_images=2)
    assert calls == {"resolved": 1, "shape_key": 1, "pipelines": 0}
    assert dispatched == [result.shape_key] and result.shape_key.batch == 2
    assert result.request is not None and result.request.steps == tiny_engine.default_steps == 8
    # negative control: the spies count (a direct pipeline call plans the edit itself, once)
    pipe = pipeline_module.KontextPipeline(tiny_engine.components, tiny_engine.dispatcher.primary)
    pipe.edit(EditRequest(gradient_image(100, 100), "add a hat", steps=1), progress=False)
    assert calls == {"resolved": 2, "shape_key": 2, "pipelines": 1}


def test_a_pipeline_given_a_key_needs_the_steps_filled_in(tiny):
    from engine.pipeline import KontextPipeline

    pipe = KontextPipeline(tiny)
    request = EditRequest(gradient_image(100, 100), "add a hat")
    _, key = pipe.plan(request)
    with pytest.raises(ConfigError, match="steps filled in"):
        pipe.prepare(request, key=key)
    with pytest.raises(ConfigError, match="no denoiser"):
        pipe.edit(request)


def test_the_vae_lever_is_applied_once_by_the_torch_load_path(monkeypatch):
    """TorchOptions.compile_vae compiles the VAE in one place (backends.torch.with_vae_lever), which
    engine.load's torch path and the bench both call; without the lever the VAE is left as loaded."""
    import engine.backends.torch as torch_backend
    from engine.backends.torch_options import TorchOptions

    compiled: list[object] = []
    real = torch_backend.compile_vae
    monkeypatch.setattr(
        torch_backend, "compile_vae", lambda vae, mode="default": compiled.append(vae) or real(vae)
    )
    with engine.load("tiny", torch_options=TorchOptions(compile_vae=True)) as kontext:
        assert len(compiled) == 1 and kontext.components.vae is not compiled[0]
        assert kontext.components.vae.encoder is not compiled[0].encoder  # type: ignore[attr-defined]
    with engine.load("tiny") as kontext:
        assert len(compiled) == 1  # no lever, no compile

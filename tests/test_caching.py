"""Step caching on every surface and backend (the parity with diffusers' hooks: test_caching_parity.py).

Spec parsing and its one-line refusals; the split forward is the forward bit for bit; caching off is
the old loop; an engine default with a per-edit override; two threads on one engine keep their own
caches; ONNX Runtime and TensorRT (fakes) run the velocity forms and refuse the residual ones; CUDA
graphs refuse them; context parallelism (gloo) and compile run them; the CLI, the server's results,
the output metadata and the bench record what ran.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import engine
from engine.backends.inputs import dummy_inputs
from engine.backends.torch import TorchDenoiser, velocity
from engine.buckets import ShapeKey
from engine.caching import PRESETS, CacheSpec, check_cache, new_step_cache, parse_cache_spec
from engine.config import LoadOptions
from engine.errors import ConfigError
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image

SIZE = (128, 128)


def _edit(pipe: KontextPipeline, cache: str | None, steps: int = 28, seed: int = 1):
    return pipe.edit(
        EditRequest.of(gradient_image(*SIZE), "a hat", steps=steps, seed=seed, size=SIZE, cache=cache),
        progress=False,
    )


# --------------------------------------------------------------------------- the spec


def test_presets_parse_and_round_trip() -> None:
    for name, (text, source) in PRESETS.items():
        spec = parse_cache_spec(name)
        assert spec.preset == name and spec.label == name and source
        assert "," not in name  # fits a comma-separated contestant list
        assert parse_cache_spec(str(spec)) == dataclasses.replace(spec, preset=None)
        assert parse_cache_spec(text).config == spec.config
    mk = parse_cache_spec("magcache-kontext").config
    assert (mk.threshold, mk.max_skip_steps, mk.retention_ratio, mk.ratios) == (0.05, 4, 0.2, "kontext")
    assert parse_cache_spec("fbc").config.threshold == 0.08
    for off in ("off", "none", "OFF", "", None):
        assert not parse_cache_spec(off).enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("teacache", "unknown cache 'teacache'"),
        ("fbc:thresh=0.1", "keys are threshold"),
        ("fbc:threshold", "bad item"),
        ("fbc:threshold=abc", "threshold must be float"),
        ("magcache:ratios=wan", "ratios must be one of kontext, flux"),
        ("magcache:on=graph", "on must be one of"),
        ("taylorseer:cache_interval=0", "cache_interval must be >= 1"),
        ("magcache:retention_ratio=2", "retention_ratio must be in [0, 1]"),
    ],
)
def test_bad_specs_are_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        parse_cache_spec(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_request_and_load_options_take_a_spec() -> None:
    r = EditRequest.of(gradient_image(*SIZE), "x", cache="magcache-kontext")
    assert isinstance(r.cache, CacheSpec) and r.cache.preset == "magcache-kontext"
    assert EditRequest(gradient_image(*SIZE), "x", cache="fbc").cache == parse_cache_spec("fbc")
    with pytest.raises(ConfigError, match="unknown cache"):
        LoadOptions(cache="fast")


# --------------------------------------------------------------------------- torch: exact when off


def test_split_forward_is_the_forward_bit_for_bit(tiny) -> None:
    d = TorchDenoiser(tiny.transformer)
    key = ShapeKey(1, 64, 64, tiny.preset.max_sequence_length)
    inputs = dummy_inputs(tiny.preset.transformer, key, seed=3)
    s = d.stages
    assert s is not None
    with torch.inference_mode():
        split = s.head(s.rest(s.first_block(s.embed(inputs))))
        whole = velocity(tiny.transformer, inputs)
    assert torch.equal(split, whole)


def test_off_is_the_old_loop_and_threshold_zero_computes_every_step(tiny) -> None:
    pipe = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    plain = _edit(pipe, None, steps=6)
    assert plain.steps_computed == 6 and plain.cache == "" and plain.timings["steps_computed"] == 6
    assert torch.equal(_edit(pipe, "off", steps=6).latents, plain.latents)
    every = _edit(pipe, "fbc:threshold=0", steps=6)  # never skips: the split forward, bit for bit
    assert every.steps_computed == 6 and torch.equal(every.latents, plain.latents)
    skipping = _edit(pipe, "magcache-kontext", steps=6)  # negative control: a cache that skips differs
    assert skipping.steps_computed < 6 and not torch.equal(skipping.latents, plain.latents)


# --------------------------------------------------------------------------- engine default, threads


def test_engine_default_per_edit_override_and_metadata(tiny_engine, tmp_path: Path) -> None:
    tiny_engine.cache = parse_cache_spec("magcache-kontext")  # what load(cache=...) sets
    image = gradient_image(*SIZE)
    cached = tiny_engine.edit(image, "a hat", steps=28, size=SIZE)
    assert cached.steps_computed == 14 and cached.cache == "magcache-kontext (residual)"
    off = tiny_engine.edit(image, "a hat", steps=28, size=SIZE, cache="off")
    assert off.steps_computed == 28 and off.cache == ""
    other = tiny_engine.edit(image, "a hat", steps=28, size=SIZE, cache="taylorseer")
    assert other.steps_computed == 8
    saved = tiny_engine.outputs.save(cached, tmp_path / "o.png")
    text = dict(Image.open(saved.path).text)  # type: ignore[attr-defined]
    assert text["steps"] == "28" and text["steps_computed"] == "14" and text["cache"] == cached.cache
    plain = dict(Image.open(tiny_engine.outputs.save(off, tmp_path / "p.png").path).text)  # type: ignore[attr-defined]
    assert "steps_computed" not in plain and "cache" not in plain


def test_two_threads_two_specs_one_engine_keep_their_own_caches(tiny) -> None:
    from engine.dispatch import Dispatcher
    from engine.runtime import KontextEngine

    specs = {"magcache-kontext": 14, "taylorseer": 8}
    d = Dispatcher(TorchDenoiser(tiny.transformer, name="torch-eager-fp32"), family="tiny")
    with KontextEngine(tiny, d, device="cpu", dtype=torch.float32, workers=2) as kontext:
        image = gradient_image(*SIZE)
        alone = {s: kontext.edit(image, "a hat", steps=28, size=SIZE, cache=s) for s in specs}
        barrier = threading.Barrier(2)
        got: dict[str, list] = {s: [] for s in specs}

        def run(spec: str) -> None:
            barrier.wait()
            for _ in range(2):
                got[spec].append(kontext.edit(image, "a hat", steps=28, size=SIZE, cache=spec))

        threads = [threading.Thread(target=run, args=(s,)) for s in specs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    for spec, computed in specs.items():
        assert len(got[spec]) == 2
        for r in got[spec]:
            assert r.steps_computed == computed
            assert torch.equal(r.latents, alone[spec].latents)
    assert not torch.equal(alone["magcache-kontext"].latents, alone["taylorseer"].latents)


# --------------------------------------------------------------------------- one-piece backends


def test_cuda_graphs_and_one_piece_denoisers_refuse_residual_caches(tiny) -> None:
    graphed = TorchDenoiser(tiny.transformer, call=lambda inputs: velocity(tiny.transformer, inputs))
    assert graphed.stages is None
    for spec in ("fbc", "magcache:on=residual"):
        with pytest.raises(ConfigError, match="needs the transformer's first block") as e:
            check_cache(parse_cache_spec(spec), graphed)
        assert "\n" not in str(e.value)
    cache = new_step_cache(parse_cache_spec("magcache-kontext"), graphed, 28)
    assert cache is not None and cache.form == "velocity"
    from engine.backends.torch_options import TorchOptions

    with pytest.raises(ConfigError, match="needs the transformer's first block"):
        engine.load("tiny", torch_options=TorchOptions(cuda_graphs=True), cache="fbc")


def test_onnxruntime_build_runs_velocity_caches(tiny_build: Path) -> None:
    with pytest.raises(ConfigError, match="needs the transformer's first block"):
        engine.load(tiny_build, precision="fp32", threads=1, cache="fbc")  # refused before any weights
    with engine.load(tiny_build, precision="fp32", threads=1, cache="magcache-kontext") as kontext:
        image = gradient_image(*SIZE)
        r = kontext.edit(image, "a hat", steps=28, size=SIZE)
        assert r.steps_computed == 14 and r.cache == "magcache-kontext (velocity)"
        plain = kontext.edit(image, "a hat", steps=28, size=SIZE, cache="off")
        assert plain.steps_computed == 28
        rel = float((r.latents - plain.latents).norm() / plain.latents.norm())
        assert 0 < rel < 0.05
        ts = kontext.edit(image, "a hat", steps=28, size=SIZE, cache="taylorseer")
        assert ts.steps_computed == 8
        with pytest.raises(ConfigError, match="needs the transformer's first block"):
            kontext.edit(image, "a hat", steps=4, size=SIZE, cache="fbc")


def test_tensorrt_fakes_run_velocity_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from . import trt_fakes
    from .test_tensorrt_logic import CFG, _denoiser

    trt_fakes.install_fake_tensorrt(monkeypatch)
    d = _denoiser(tmp_path, {"tiny": "dynamic"})
    assert getattr(d, "stages", None) is None
    with pytest.raises(ConfigError, match="needs the transformer's first block"):
        check_cache(parse_cache_spec("fbc"), d)
    key = sorted(k for k in d.shape_keys if k.batch == 1)[0]
    for spec, computed in (("magcache-kontext", 14), ("taylorseer", 8)):
        cache = new_step_cache(parse_cache_spec(spec), d, 28)
        assert cache is not None
        outs = []
        for i in range(28):
            x = dummy_inputs(CFG, key, seed=i)  # the fake: velocity = 2 * hidden_states + timestep
            outs.append(cache.velocity(i, d, x, key.target_tokens))
        assert cache.computed == computed
        for i in set(range(28)) - set(cache.computed_steps):  # a skipped step is not this step's velocity
            x = dummy_inputs(CFG, key, seed=i)
            want = (2 * x["hidden_states"] + x["timestep"][:, None, None])[:, : key.target_tokens]
            assert not torch.allclose(outs[i], want)
    d.close()


@pytest.mark.slow
def test_context_parallel_ranks_follow_rank_zeros_decisions() -> None:
    """Two processes on gloo: rank 0 decides, the workers run exactly the forwards it sends, so the
    split edit equals one process with the same (velocity) cache; a residual cache is refused first."""
    with pytest.raises(ConfigError, match="needs the transformer's first block"):
        engine.load("tiny", context_parallel=2, cache="fbc")
    spec = "magcache:threshold=0.05,max_skip_steps=4,retention_ratio=0.2,ratios=kontext,on=velocity"
    image = gradient_image(*SIZE)
    with engine.load("tiny") as one, engine.load("tiny", context_parallel=2, cache="magcache-kontext") as two:
        a = one.edit(image, "a hat", steps=28, size=SIZE, cache=spec)
        b = two.edit(image, "a hat", steps=28, size=SIZE)
    assert a.steps_computed == b.steps_computed == 14 and b.cache.endswith("(velocity)")
    assert float((a.latents - b.latents).norm() / a.latents.norm()) < 1e-5


@pytest.mark.slow
def test_compiled_blocks_run_the_split_forward(tiny) -> None:
    from engine.backends.torch import compile_blocks, weight_sharing_copy

    eager = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    compiled = KontextPipeline(tiny, TorchDenoiser(compile_blocks(weight_sharing_copy(tiny.transformer))))
    for spec in ("fbc:threshold=0.3", "magcache-kontext"):
        a, b = _edit(eager, spec), _edit(compiled, spec)
        assert a.steps_computed == b.steps_computed < 28
        assert float((a.latents - b.latents).norm() / a.latents.norm()) < 1e-4


# --------------------------------------------------------------------------- surfaces


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=600, check=False
    )


def test_cli_line_and_bad_spec(tmp_path: Path) -> None:
    bad = _cli("edit", "--cache", "fbc:threshold=x", "-o", str(tmp_path / "x.png"))
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "threshold must be float" in lines[0], bad.stderr
    ok = _cli(
        "edit", "--cache", "magcache-kontext", "--steps", "28", "--no-progress", "-o", str(tmp_path / "o.png")
    )
    assert ok.returncode == 0, ok.stderr
    assert "28 steps, 14 computed" in ok.stdout


def test_server_results_carry_steps_computed(tmp_path: Path) -> None:
    from engine.serve.editor import LocalEditor

    from .serve_harness import SAMPLE, SAMPLE_B64, poll, serve

    kontext = engine.load("tiny", cache="magcache-kontext")
    try:
        with serve(tmp_path, lambda: LocalEditor(kontext, owned=False)) as server, server.client() as c:
            job = c.post(
                "/v1/flux-kontext-dev", json={"prompt": "a hat", "input_image": SAMPLE_B64, "steps": 28}
            )
            body = poll(c, job.json()["id"], timeout=300)
            assert body["status"] == "Ready", body
            assert (
                body["result"]["steps_computed"] == 14 and body["result"]["timings"]["steps_computed"] == 14
            )
            r = c.post(
                "/v1/images/edits",
                files={"image": ("c.png", SAMPLE, "image/png")},
                data={"prompt": "a hat", "steps": "28"},
                timeout=300,
            )
            assert r.status_code == 200, r.text
            assert r.json()["steps_computed"] == 14
            png = Image.open(io.BytesIO(httpx.get(body["result"]["sample"]).content))
            assert png.text["steps_computed"] == "14"  # type: ignore[attr-defined]
    finally:
        kontext.close()


def test_bench_contestant_names_and_cache_records(tiny) -> None:
    from engine.bench.contestants import split_step_cache
    from engine.bench.report import result_records
    from engine.bench.run import BenchConfig
    from engine.bench.runner import run_bench

    assert split_step_cache("torch-eager+cache") == ("torch-eager+cache", None)  # the prompt cache
    head, spec = split_step_cache("torch-fp8+qkv+cache=magcache:threshold=0.05;max_skip_steps=4")
    assert head == "torch-fp8+qkv" and spec is not None and spec.config.max_skip_steps == 4
    config = BenchConfig(
        steps=28,
        repeats=1,
        warmup=0,
        buckets=(SIZE,),
        contestants=("torch-eager", "torch-eager+cache=magcache-kontext"),
        progress=False,
    )
    run = run_bench(config, components=tiny)
    records = {r["contestant"]: r for r in result_records(run)}
    plain, cached = records["torch-eager-fp32"], records["torch-eager-fp32+cache=magcache-kontext"]
    assert plain["steps_computed"] == 28 and "step_cache" not in plain
    assert cached["steps_computed"] == 14
    c = cached["step_cache"]
    assert c["uncached"] == "torch-eager-fp32" and c["speedup_total"] > 0
    assert 0 < c["latent_rel_l2"] < 0.05 and c["latent_psnr_db"] > 20 and "random weights" in c["note"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["eager", "compile", "fp8"])
def test_split_forward_caches_on_gpu(mode: str) -> None:
    """On CUDA in bf16: a never-skipping FBC is the uncached edit (the split forward runs the same
    compiled blocks and FP8 Linears), MagCache computes its 14 of 28 steps; not run in this repo yet."""
    from engine.backends.fp8 import fp8_supported

    if mode == "fp8" and not fp8_supported(torch.cuda.get_device_capability()):
        pytest.skip("FP8 needs compute capability >= 8.9")
    image = gradient_image(*SIZE)
    with engine.load("tiny", device="cuda", torch_mode=mode) as kontext:
        plain = kontext.edit(image, "a hat", steps=28, size=SIZE)
        every = kontext.edit(image, "a hat", steps=28, size=SIZE, cache="fbc:threshold=0")
        mag = kontext.edit(image, "a hat", steps=28, size=SIZE, cache="magcache-kontext")
    assert every.steps_computed == 28 and mag.steps_computed == 14
    a, b = every.latents.float(), plain.latents.float()
    assert float((a - b).norm() / b.norm()) < 1e-2
    assert torch.isfinite(mag.latents).all()


def test_edit_and_serve_take_the_cache_flag() -> None:
    from engine.cli.parser import build_parser

    p = build_parser()
    assert p.parse_args(["edit", "--cache", "magcache-kontext"]).cache == "magcache-kontext"
    assert p.parse_args(["serve", "--cache", "fbc"]).cache == "fbc"
    assert p.parse_args(["serve"]).cache is None


def test_unbatched_seeds_report_passes_per_image(tiny) -> None:
    from engine.pipeline import combine_results

    pipe = KontextPipeline(tiny, TorchDenoiser(tiny.transformer))
    one, two = _edit(pipe, "magcache-kontext", seed=1), _edit(pipe, "magcache-kontext", seed=2)
    both = combine_results([one, two])
    assert both.steps_computed == 14 and both.timings["steps_computed"] == 14 and len(both.images) == 2

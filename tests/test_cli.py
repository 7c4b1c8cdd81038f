"""`kontext edit` / `kontext info` end to end on the tiny preset, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.assets import sample_image_path
from engine.buckets import nearest_bucket
from engine.cli import main
from engine.cli.bench import bench_config
from engine.cli.edit import edit_request
from engine.cli.parser import build_parser
from engine.cli.serve import serve_settings
from engine.config import DEFAULT_PROMPT, DEFAULT_STEPS, PRESETS, SYNTHETIC_STEPS
from engine.images import load_image, read_png_metadata
from engine.loading import default_steps
from engine.model.layout import SIDECAR
from engine.runtime import load
from engine.serve import settings as settings_module


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_edit_writes_png_whose_metadata_round_trips(tmp_path):
    out = tmp_path / "out.png"
    code = main(
        ["edit", "--steps", "2", "--seed", "3", "--no-progress", "-o", str(out), "--", "", "make it snowy ❄"]
    )
    assert code == 0
    meta = read_png_metadata(out)
    assert meta["prompt"] == "make it snowy ❄"
    assert (meta["seed"], meta["steps"], meta["guidance"]) == ("3", "2", "2.5")
    assert meta["model"] == "tiny" and meta["backend"].startswith("torch-eager")
    img = load_image(out)
    # the sample is 451x300 (ar 1.50): the tiny family's nearest bucket is 160x96
    assert nearest_bucket(451, 300, "tiny") == (160, 96)
    assert img.size == (160, 96)
    assert meta["size"] == "160x96"


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "5"), (b, "5"), (c, "6")):
        assert main(["edit", "--steps", "2", "--seed", seed, "--no-progress", "-o", str(path)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_size_override(tmp_path):
    out = tmp_path / "sq.png"
    assert main(["edit", "--steps", "1", "--size", "128x128", "--no-progress", "-o", str(out)]) == 0
    assert load_image(out).size == (128, 128)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edit", "/no/such/image.png", "a hat"], "no such file"),
        (["edit", "--steps", "0"], "steps must be"),
        (["edit", "--size", "100x64"], "multiples of 16"),
        (["edit", "--model", "/no/such/model"], "hf download"),
        (["edit", "--context-parallel", "2", "--levers", "graphs"], "cannot replay cuda graphs"),
        (["edit", "--context-parallel", "0"], "context_parallel must be 1"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path):
    r = run_cli(*args, "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0].lower(), r.stderr
    assert not (tmp_path / "x.png").exists()


def test_text_file_as_image_is_refused(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    r = run_cli("edit", str(bad), "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error" in r.stderr


def test_info_lists_presets_and_buckets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "onnxruntime", "tensorrt", "tiny", "kontext-dev", "1mp", "17 buckets"):
        assert needle in out


# ------------------------------------------------------------------ one default per setting


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_edit_serve_and_bench_share_the_model_defaults(model):
    """Steps: one rule (loading.default_steps, the preset's value) behind edit, serve and bench; guidance
    and prompt: config's. `serve --model full` once ran 8 steps where `edit --model full` ran 28."""
    p = build_parser()
    edit = p.parse_args(["edit", "--model", model, "", "a hat"])
    serve = p.parse_args(["serve", "--model", model, "--no-auth"])
    bench = p.parse_args(["bench", "--model", model, "--device", "cpu"])
    want = PRESETS[model].default_steps
    assert want == (SYNTHETIC_STEPS if model in ("tiny", "small") else DEFAULT_STEPS)
    assert default_steps(model) == want
    assert serve_settings(serve).default_steps == want
    assert bench_config(bench).steps == want
    request = edit_request(edit, sample_image_path())
    assert request.steps is None and request.resolved(want).steps == want  # the engine fills it in
    assert edit.guidance == bench.guidance == request.guidance == settings_module.DEFAULT_GUIDANCE == 2.5
    assert bench.prompt == DEFAULT_PROMPT and p.parse_args(["edit"]).prompt is None  # edit: the demo fills it
    assert (
        serve_settings(p.parse_args(["serve", "--model", model, "--no-auth", "--steps", "3"])).default_steps
        == 3
    )


def test_a_build_and_local_weights_default_to_their_model_steps(tiny_build, tmp_path, capsys):
    """`--build build/tiny`: edit, serve and the loaded engine all run the tiny preset's 8 steps (serve
    once ran 28); a local diffusers folder: its kontext.json's, else the real model's 28."""
    serve = build_parser().parse_args(["serve", "--build", str(tiny_build), "--no-auth"])
    assert default_steps(tiny_build) == serve_settings(serve).default_steps == SYNTHETIC_STEPS
    with load(tiny_build) as kontext:
        assert kontext.default_steps == SYNTHETIC_STEPS
    out = tmp_path / "out.png"
    assert main(["edit", "--build", str(tiny_build), "--no-progress", "-o", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["steps"] == str(SYNTHETIC_STEPS) and meta["engine"] == tiny_build.name
    assert str(tiny_build.parent) not in capsys.readouterr().out + "".join(meta.values())
    folder = tmp_path / "weights"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(
        json.dumps(PRESETS["tiny"].transformer.to_diffusers())
    )
    (folder / SIDECAR).write_text(
        json.dumps({"preset": "tiny", "bucket_family": "tiny", "max_sequence_length": 32, "default_steps": 5})
    )
    assert default_steps(folder) == 5
    (folder / SIDECAR).unlink()
    assert (
        default_steps(folder) == DEFAULT_STEPS
    )  # a non-standard config without kontext.json: the real defaults


def test_edit_writes_the_compile_cache_it_names(tmp_path, monkeypatch):
    """--compile-cache is read at load and written after the edits (it was read and never written)."""
    import torch

    from engine.backends.compile_cache import cache_file

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    cache = tmp_path / "cache"
    args = ["edit", "--steps", "1", "--torch-mode", "compile", "--no-progress", "--compile-cache", str(cache)]
    args += ["-o", str(tmp_path / "o.png")]
    assert main(args) == 0
    assert cache_file(cache).read_bytes() == b"compiled"

"""One set of load flags (parser.add_load_flags) and one LoadOptions builder (common.load_options) for
`kontext edit`, `serve` and `bench`; `--build` and its deprecated spellings; defaults read from the
dataclasses and shown by --help; `kontext --version`. In-process: argparse only, no model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest

from engine.backends.torch_options import TorchOptions
from engine.cli import main
from engine.cli.common import load_options, load_source
from engine.cli.parser import build_parser, default_of
from engine.config import LoadOptions
from engine.errors import ConfigError
from engine.serve.settings import ServeSettings
from engine.version import __version__

# Every load flag with a value other than its default (the FP8 path on a GPU, as a production server runs it).
LOAD_FLAGS = [
    "--model", "small",
    "--device", "cuda",
    "--backend", "torch",
    "--precision", "bf16",
    "--miss-policy", "torch",
    "--threads", "3",
    "--dtype", "bf16",
    "--torch-mode", "fp8",
    "--levers", "qkv,dynamic",
    "--compile-cache", "build/cc",
    "--lora", "style.safetensors:0.8",
    "--context-parallel", "2",
]  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_serve_takes_every_load_flag_of_edit_and_builds_the_same_load_options() -> None:
    edit = parse("edit", "in.png", "a hat", *LOAD_FLAGS)
    serve = parse("serve", "--no-auth", *LOAD_FLAGS)
    want = LoadOptions(
        backend="torch",
        precision="bf16",
        device="cuda",
        miss_policy="torch",
        threads=3,
        torch_mode="fp8",
        dtype="bf16",
        context_parallel=2,
    )
    assert load_options(edit) == load_options(serve) == want
    for name in ("levers", "compile_cache", "lora", "model"):  # the rest of a load: the same values
        assert getattr(edit, name) == getattr(serve, name)
    assert serve.levers == "qkv,dynamic" and serve.lora == ["style.safetensors:0.8"]
    # negative control: a field that differs shows up in the comparison
    assert load_options(parse("serve", "--no-auth", "--torch-mode", "compile")) != load_options(edit)


def test_every_load_options_field_but_the_servers_own_has_a_flag() -> None:
    """A new LoadOptions field is a new flag (or a documented exception), or this fails."""
    args = parse("edit", *LOAD_FLAGS)
    flagged = {f.name for f in dataclasses.fields(LoadOptions) if hasattr(args, f.name)}
    assert set(f.name for f in dataclasses.fields(LoadOptions)) - flagged == {"workers", "plan_memory_budget"}


def test_defaults_come_from_the_dataclasses() -> None:
    edit, serve = parse("edit"), parse("serve", "--no-auth")
    assert load_options(edit) == load_options(serve) == LoadOptions()  # no flag: every default
    assert edit.torch_mode == default_of(LoadOptions, "torch_mode") == "eager"
    assert edit.compile_cache == default_of(TorchOptions, "compile_cache")
    for flag, field in (("port", "port"), ("queue", "queue"), ("host", "host"), ("data", "data")):
        assert getattr(serve, flag) == default_of(ServeSettings, field)
    assert serve.max_body_mb * 2**20 == default_of(ServeSettings, "max_body_bytes")
    with pytest.raises(KeyError):
        default_of(ServeSettings, "no_such_field")


def test_bench_reads_its_load_flags_through_the_same_builder() -> None:
    from engine.cli.bench import bench_config

    bench = parse("bench", "--build", "build/tiny", "--device", "cpu", "--context-parallel", "2")
    assert load_options(bench) == LoadOptions(device="cpu", context_parallel=2)
    config = bench_config(bench)
    assert config.build_dir == Path("build/tiny") and config.device == "cpu"
    assert any(c.endswith("+cp2") for c in config.contestants or ())
    with pytest.raises(SystemExit):  # the torch path's levers are per contestant in a bench
        parse("bench", "--torch-mode", "fp8")


@pytest.mark.parametrize(
    ("argv", "old"),
    [
        (["edit", "--engine", "build/x"], "--engine"),
        (["serve", "--no-auth", "--engine", "build/x"], "--engine"),
        (["bench", "--build-dir", "build/x"], "--build-dir"),
        (["build", "--out", "build/x"], "--out"),
    ],
)
def test_old_build_folder_spellings_are_aliases_that_say_so(argv: list[str], old: str) -> None:
    args = parse(*argv)
    assert args.build == Path("build/x") and args.deprecated_flags == [old]
    new = parse(*[("--build" if a == old else a) for a in argv])
    assert new.build == Path("build/x") and not getattr(new, "deprecated_flags", None)


def test_calib_samples_is_the_old_spelling_of_calib_edits(capsys: pytest.CaptureFixture[str]) -> None:
    old, new = parse("build", "--calib-samples", "3"), parse("build", "--calib-edits", "3")
    assert old.calib_edits == new.calib_edits == 3
    assert old.deprecated_flags == ["--calib-samples"] and not getattr(new, "deprecated_flags", None)
    assert parse("build").calib_edits is None  # unset: CalibrationSpec's default
    with pytest.raises(SystemExit):
        parse("build", "--help")
    shown = capsys.readouterr().out
    assert "--calib-edits" in shown and "--calib-samples" not in shown  # not offered, still accepted


def test_an_old_spelling_logs_one_deprecation_line(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.cli"):
        code = main(["edit", str(tmp_path / "in.png"), "a hat", "--engine", str(tmp_path / "nothere")])
    assert code == 2  # the image does not exist: refused, after the deprecation line
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert lines == ["--engine is deprecated: spell it --build (the one name of a build folder)"]


def test_model_and_build_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drop --model"):
        load_source(parse("edit", "--model", "tiny", "--build", str(tmp_path)))
    assert load_source(parse("edit")) == "tiny"
    assert load_source(parse("serve", "--no-auth", "--model", "small")) == "small"


def test_help_shows_defaults_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("edit", "--help")
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: build/edit.png)" in text and "the noise seed (default: 0)" in text
    assert "(default: eager)" in text and "add a small red hat" in text  # the demo is said
    with pytest.raises(SystemExit):
        parse("serve", "--help")
    assert "(default: 8000)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_:
        parse("--version")
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"kontext {__version__}"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backend", "tvm", "backend must be one of torch, onnxruntime, tensorrt"),
        ("torch_mode", "warp", "torch_mode must be one of eager, compile, fp8"),
        ("miss_policy", "ignore", "miss_policy must be one of error, torch"),
    ],
)
def test_load_options_checks_its_names_once_where_it_is_made(field: str, value: str, message: str) -> None:
    """The names live in config.py; the CLI's choices are the same tuples, so argparse refuses first."""
    with pytest.raises(ConfigError, match=message):
        LoadOptions(**{field: value})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(SystemExit):
        parse("edit", flag, value)

"""`kontext edit` / `kontext info` end to end on the tiny preset, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.buckets import nearest_bucket
from engine.cli import main
from engine.images import load_image, read_png_metadata


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
        (["edit", "/no/such/image.png"], "no such file"),
        (["edit", "--steps", "0"], "steps must be"),
        (["edit", "--size", "100x64"], "multiples of 16"),
        (["edit", "--model", "/no/such/model"], "huggingface-cli download"),
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

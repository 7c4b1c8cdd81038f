"""Each refusal of the CLI: exit status 2 and one line on stderr, said before any heavy import (torch,
diffusers) where the mistake is in what the user typed, so it is answered at once and no model loads.
Each case runs `kontext` in a fresh interpreter that reports which heavy modules it imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.assets import sample_image_path
from engine.prompts import MAX_PROMPT_CHARS

# Run main() with argv; after it, one marker line saying whether torch and diffusers were imported.
RUN = (
    "import sys\n"
    "from engine.cli import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    rc = e.code\n"
    "heavy = [f'{m}={m in sys.modules}' for m in ('torch', 'diffusers')]\n"
    "sys.stderr.write('\\nHEAVY ' + ' '.join(heavy) + '\\n')\n"
    "sys.exit(rc)\n"
)
SAMPLE = str(sample_image_path())


def kontext(*args: str) -> tuple[int, list[str], str]:
    """(exit status, stderr's lines without the marker, the marker)."""
    r = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    marker = lines.pop() if lines and lines[-1].startswith("HEAVY") else ""
    return r.returncode, lines, marker


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([SAMPLE], "say what to change, e.g. kontext edit"),  # an image without a prompt
        (["/no/such.png"], "is no file: give the image first"),
        (["/no/such.png", "a hat"], "No such file"),
        ([SAMPLE, "   "], "the prompt is empty"),
        ([SAMPLE, "x" * (MAX_PROMPT_CHARS + 1)], f"over the limit of {MAX_PROMPT_CHARS}"),
        ([SAMPLE, "a hat", "--then", ""], "the prompt is empty"),
        ([SAMPLE, "a hat", "-o", "/proc/out.png"], "cannot write in /proc"),
        ([SAMPLE, "a hat", "-o", "out.gif"], "outputs are .png, .jpg or .jpeg"),
        ([SAMPLE, "a hat", "--build", "build/nothere"], "not a build; make one with `kontext build"),
        ([SAMPLE, "a hat", "--model", "tiny", "--build", "build/x"], "drop --model"),
        ([SAMPLE, "a hat", "--steps", "0"], "steps must be between"),
        ([SAMPLE, "a hat", "--context-parallel", "0"], "context_parallel must be 1"),
        ([SAMPLE, "a hat", "--then", "b", "--num-images", "2"], "--then edits one image per turn"),
    ],
)
def test_edit_refuses_in_one_line_before_importing_torch(args: list[str], message: str) -> None:
    code, lines, marker = kontext("edit", *args)
    assert code == 2, lines
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], lines
    assert lines[0].startswith("kontext edit: error: ")
    assert marker == "HEAVY torch=False diffusers=False"  # nothing heavy was imported: no model loaded


def test_output_folder_is_called_a_folder_not_no_suffix(tmp_path: Path) -> None:
    code, lines, marker = kontext("edit", SAMPLE, "a hat", "-o", str(tmp_path))
    assert code == 2 and len(lines) == 1 and "is a folder; give a file name in it" in lines[0], lines
    assert "no suffix" not in lines[0] and marker.endswith("torch=False diffusers=False")


def test_build_folder_without_a_manifest_says_how_to_build_it(tmp_path: Path) -> None:
    code, lines, _ = kontext("serve", "--no-auth", "--build", str(tmp_path))
    assert code == 2 and len(lines) == 1, lines
    assert "has no manifest.json" in lines[0] and f"--build {tmp_path}`" in lines[0]
    assert "licence" not in lines[0] and "preset" in lines[0]


def test_usage_errors_and_keys_new_import_no_torch(tmp_path: Path) -> None:
    code, lines, marker = kontext("edit", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in lines[-1]
    assert marker == "HEAVY torch=False diffusers=False"
    keys = tmp_path / "keys.jsonl"
    r = subprocess.run(
        [sys.executable, "-c", RUN, "keys", "new", "--file", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and len(r.stdout.strip()) > 20  # the key, once
    assert r.stderr.strip().endswith("HEAVY torch=False diffusers=False")
    assert keys.read_text().count("\n") == 1


def test_serve_and_bench_refuse_before_loading() -> None:
    code, lines, marker = kontext("serve")
    assert code == 2 and len(lines) == 1 and "needs --keys FILE" in lines[0]
    assert marker == "HEAVY torch=False diffusers=False"
    code, lines, marker = kontext("bench", "--prompt", " ")
    assert code == 2 and len(lines) == 1 and "the prompt is empty" in lines[0]
    assert marker == "HEAVY torch=False diffusers=False"


def test_fp8_on_a_cpu_names_the_cli_flag_not_python() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU may run FP8")
    code, lines, marker = kontext("edit", SAMPLE, "a hat", "--torch-mode", "fp8")
    assert code == 2 and len(lines) == 1, lines
    assert "--torch-mode eager" in lines[0] and "mode='eager'" not in lines[0]
    assert marker.endswith("diffusers=False")  # refused before the model's libraries load


def test_trt_first_run_refuses_in_one_line_on_a_machine_without_tensorrt() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine may run it")
    r = subprocess.run(
        [sys.executable, "benchmarks/trt_first_run.py"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("trt_first_run: TensorRT needs a CUDA GPU")


def test_trial_credentials_takes_a_str_folder(tmp_path: Path) -> None:
    from engine.provenance import trial_credentials

    creds = trial_credentials(str(tmp_path / "c2pa"))
    assert creds.chain.is_file() and creds.key.is_file()

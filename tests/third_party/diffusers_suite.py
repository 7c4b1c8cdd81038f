"""Run diffusers' own FluxKontextPipeline fast tests with our adapter in place of the transformer.

    PYTHONPATH=$PWD .venv/bin/python tests/third_party/diffusers_suite.py --diffusers GIT_DIR [--rev REV]

GIT_DIR: a git clone of github.com/huggingface/diffusers (a bare mirror will do); REV: the tag matching
the installed diffusers (default: v<installed version>, else HEAD). The tests are not vendored: the
Kontext test imports 20 of diffusers' test modules (about 15,000 lines, Apache-2.0). This script exports
diffusers' tests/ from GIT_DIR at REV into a scratch folder, unchanged, and runs
tests/pipelines/flux/test_pipeline_flux_kontext.py offline four times: stock transformer and adapter,
each with the tests' config (guidance_embeds=False) and with Kontext [dev]'s (True). The two Hub
repositories the test loads are replaced by local folders of the same names (a tiny random T5 config
and tokenizer, a tiny CLIP tokenizer: engine.model.tokenizers' in-memory tokenizers), and stand-ins for
`parameterized` and `requests_mock` are written where they are not installed (imported by test modules
the common tests import; none of their tests run). Prints one line per run, then a table; exits 1 if
the adapter fails a test the stock transformer passes in the same config (IP-Adapter aside: refused).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEST = "tests/pipelines/flux/test_pipeline_flux_kontext.py"
RUNS = (("stock", "0"), ("adapter", "0"), ("stock", "1"), ("adapter", "1"))
REFUSED = {"test_ip_adapter"}  # IP-Adapter: refused by the adapter, by design (docs/diffusers.md)
# Imported at module level by test modules the common tests import (none of their tests run here).
OPTIONAL_TEST_DEPS = ("parameterized", "requests_mock")
STUB = '''"""Stand-in for a test dependency that is not installed: importable, and any attribute or call
is a no-op that returns itself (a decorator returns what it decorates). None of its tests run here."""


class _Any:
    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

    def __getattr__(self, name):
        return self


def __getattr__(name):
    return _Any()
'''


def export_tests(git_dir: Path, rev: str, out: Path) -> str:
    """diffusers' tests/ at `rev` into out/tests; returns the commit."""
    commit = subprocess.check_output(["git", "-C", str(git_dir), "rev-parse", f"{rev}^{{commit}}"], text=True)
    archive = subprocess.run(
        ["git", "-C", str(git_dir), "archive", rev, "tests"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return commit.strip()


def write_stand_ins(out: Path) -> None:
    """hf-internal-testing/tiny-random-t5 (config + tokenizer) and tiny-random-clip (tokenizer) as
    local folders: from_pretrained takes an existing folder of that name before asking the Hub."""
    from transformers import T5Config

    from engine.model.tokenizers import build_tokenizers

    clip, t5 = build_tokenizers()
    t5_dir, clip_dir = (
        out / "hf-internal-testing/tiny-random-t5",
        out / "hf-internal-testing/tiny-random-clip",
    )
    config = T5Config(
        vocab_size=1000,  # >= the tokenizer's pieces
        d_model=32,  # the test's joint_attention_dim
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_decoder_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    config.save_pretrained(t5_dir)
    t5.save_pretrained(t5_dir)
    clip.save_pretrained(clip_dir)
    for name in OPTIONAL_TEST_DEPS:
        if importlib.util.find_spec(name) is None:
            (out / f"{name}.py").write_text(STUB)
    shutil.copy(HERE / "diffusers_plugin.py", out / "diffusers_plugin.py")


def run(out: Path, transformer: str, guidance: str, extra: list[str]) -> tuple[dict[str, int], set[str]]:
    """One pytest run -> ({passed/failed/skipped/error: count}, names of the failed tests)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(out), str(REPO)]),
        "KONTEXT_SUITE_TRANSFORMER": transformer,
        "KONTEXT_SUITE_GUIDANCE": guidance,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    cmd = [sys.executable, "-m", "pytest", TEST, "-p", "diffusers_plugin", "-p", "no:cacheprovider"]
    proc = subprocess.run([*cmd, "-q", "-rfE", *extra], cwd=out, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    counts = {
        k.rstrip("s"): int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1])
    }
    if not counts:
        raise SystemExit(f"pytest did not run ({transformer}, guidance {guidance}):\n{proc.stdout[-3000:]}")
    return counts, set(re.findall(r"^(?:FAILED|ERROR) \S+::(\w+)", proc.stdout, re.M))


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--diffusers", type=Path, required=True, help="a git clone of huggingface/diffusers")
    p.add_argument("--rev", default=None, help="default: v<installed diffusers>, else HEAD")
    p.add_argument("--keep", type=Path, default=None, help="prepare and keep the scratch folder here")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest (after --: -- -k save_load)")
    args = p.parse_args()
    installed = md.version("diffusers")
    rev = args.rev or f"v{installed}"
    git = ["git", "-C", str(args.diffusers)]
    if subprocess.run([*git, "rev-parse", "-q", "--verify", rev], capture_output=True).returncode != 0:
        print(f"no {rev} in {args.diffusers}; using HEAD", file=sys.stderr)
        rev = "HEAD"
    out = args.keep or Path(tempfile.mkdtemp(prefix="diffusers-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    commit = export_tests(args.diffusers, rev, out)
    write_stand_ins(out)
    print(f"diffusers {installed} installed; tests from {rev} ({commit}); in {out}", flush=True)
    results = {}
    for transformer, guidance in RUNS:
        counts, failed = results[transformer, guidance] = run(out, transformer, guidance, args.pytest_args)
        names = ",".join(sorted(failed)) or "-"
        print(f"{transformer:7} guidance_embeds={guidance == '1'!s:5} {counts} failed: {names}", flush=True)
    print("| transformer | guidance_embeds | passed | failed | skipped |\n|---|---|---|---|---|")
    for (transformer, guidance), (counts, _) in results.items():
        row = " | ".join(str(counts.get(k, 0)) for k in ("passed", "failed", "skipped"))
        print(f"| {transformer} | {guidance == '1'} | {row} |")
    if args.keep is None:
        shutil.rmtree(out, ignore_errors=True)
    worse = {g: results["adapter", g][1] - results["stock", g][1] - REFUSED for g in ("0", "1")}
    for g, names in worse.items():
        if names:
            print(f"adapter fails what stock passes (guidance_embeds={g == '1'}): {sorted(names)}")
    return 1 if any(worse.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

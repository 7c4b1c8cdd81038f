"""The docs hold together: every relative link in README.md and docs/*.md names a file that exists,
and every #anchor a heading of that file; and every command they show runs as written (a slow test:
the sh, bash and python blocks, in order, in a clean clone, on the tiny preset), unless the block is
marked `<!-- docs-test: skip (why) -->` (a GPU, TensorRT, gated weights, the network, your own files)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_TIMEOUT_S = (
    1800  # a page's blocks together (README: 15 min on a loaded 2-core machine); python blocks each too
)


def _prose(path: Path) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(path) if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall("\n".join(_prose(page))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_the_checker_catches_a_bad_link_and_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n[ok](a.md#title) [gone](b.md) [nope](a.md#missing)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md (no such file)", "a.md#missing (no such heading)"]


# --------------------------------------------------------------------------- the commands, run as written

MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")
FENCE = re.compile(r"^\s*```(?P<lang>\w*)\s*$")  # a fence may be indented (in a list item)
RUN_LANGS = {"sh", "bash", "python"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: `skip` is the reason of its marker comment, if it has one."""

    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None

    def where(self) -> str:
        page = f"docs/{self.page.name}" if self.page.parent.name == "docs" else self.page.name
        return f"{page}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The sh, bash and python blocks of `page`, in order. A block is skipped by the comment
    `<!-- docs-test: skip (why) -->` on the line right above its fence."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```"))
        if m["lang"] in RUN_LANGS:
            above = MARKER.search(lines[i - 1]) if i else None
            indent = len(lines[i]) - len(lines[i].lstrip())
            code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
            out.append(Block(page, i + 1, m["lang"], code, above["why"] if above else None))
        i = end + 1
    return out


def test_the_extractor_reads_blocks_and_skip_markers(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "p.md"
    page.parent.mkdir()
    page.write_text(
        "# T\n```sh\necho one\n```\n<!-- docs-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n"
        "```\ntree\n```\n```json\n{}\n```\n- item:\n\n  ```sh\n  echo two\n  ```\n"
    )
    blocks = code_blocks(page)
    assert [(b.line, b.lang, b.code, b.skip) for b in blocks] == [
        (2, "sh", "echo one\n", None),
        (6, "python", "x = 1\n", "needs a GPU"),
        (17, "sh", "echo two\n", None),
    ]


def test_every_skipped_block_says_why() -> None:
    for page in PAGES:
        for block in code_blocks(page):
            assert block.skip is None or len(block.skip.strip()) > 5, block.where()


COMMAND = re.compile(r"`(?:kontext|python|pytest) ")  # a command named in the text, without its path


def needs_venv_note(text: str) -> bool:
    """A page that names `kontext`, `python` or `pytest` bare must say once where they come from."""
    return COMMAND.search(text) is not None and ".venv/bin/" not in text


def test_every_page_naming_commands_says_where_they_come_from() -> None:
    """A reader of any page can run what it names: bare names come with a note on the virtual
    environment's programs (`.venv/bin/`, or activating it), on the page itself."""
    assert [p.name for p in PAGES if p.name != "DESIGN-NOTES.md" and needs_venv_note(p.read_text())] == []
    assert needs_venv_note("run `kontext build` first") and not needs_venv_note("`.venv/bin/kontext build`")


def serve_on(code: str, port: int) -> str:
    """`code` with the documented port 8000 replaced by `port` (a free one: other servers may hold
    8000): in URLs, and as `--port` on every `kontext serve` command."""
    code = re.sub(r"(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{port}", code)
    out = []
    for line in code.splitlines():
        m = re.match(r"^(?P<cmd>[^#]*?kontext serve\b[^&#]*?)(?P<rest>\s*[&#].*)?$", line)
        out.append(f"{m['cmd']} --port {port}{m['rest'] or ''}" if m else line)
    return "\n".join(out) + "\n"


def test_serve_on_moves_every_server_to_the_free_port() -> None:
    code = ".venv/bin/kontext serve --model tiny &   # on 8000\ncurl localhost:8000/readyz 127.0.0.1:8000/x\n"
    assert serve_on(code, 5123) == (
        ".venv/bin/kontext serve --model tiny --port 5123 &   # on 8000\n"
        "curl localhost:5123/readyz 127.0.0.1:5123/x\n"
    )


def page_script(page: Path, workdir: Path, port: int, timeout_s: int) -> str:
    """A bash script running `page`'s blocks in order in one shell (variables carry from block to
    block, as in a reader's terminal): each announced on stderr, python blocks saved to a file and run
    with a timeout, skipped blocks only named; background jobs stopped when it ends."""
    parts = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT",
    ]
    for n, block in enumerate(code_blocks(page)):
        if block.skip is not None:
            parts.append(f"echo {shlex.quote(f'docs-test: skip {block.where()} ({block.skip})')} >&2")
            continue
        parts.append(f"echo {shlex.quote(f'docs-test: run {block.where()}')} >&2")
        if block.lang == "python":
            snippet = workdir / f".docs-test-{page.stem}-{n}.py"
            snippet.write_text(serve_on(block.code, port))
            parts.append(f"timeout {timeout_s} .venv/bin/python {shlex.quote(snippet.name)}")
        else:
            parts.append(serve_on(block.code, port))
    return "\n".join(parts) + "\n"


@pytest.fixture(scope="module")
def clean_clone() -> Iterator[Path]:
    """A copy of the repository in its own temp folder (pytest's basetemp rotation, run by any other
    pytest on this machine, could remove a tmp_path during the 20 minutes this takes)."""
    with tempfile.TemporaryDirectory(prefix="kontext-docs-") as tmp:
        yield copy_repo(Path(tmp) / "kontext")


def copy_repo(clone: Path) -> Path:
    """The repository's tracked and unignored files at `clone` (no build/, no results), with this
    interpreter's virtual environment as its .venv (never reinstalled: `make -q install` must agree)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (clone / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name.decode())
    (clone / ".venv").symlink_to(Path(sys.prefix))
    stamps = sorted((clone / ".venv").glob(".installed-*"))  # what `make install` leaves
    if stamps:  # the copy is newer than the install; its pyproject.toml must not trigger a reinstall
        before = stamps[0].stat().st_mtime - 1
        os.utime(clone / "pyproject.toml", (before, before))
    if subprocess.run(["make", "-q", "install"], cwd=clone, capture_output=True).returncode != 0:
        pytest.skip("the .venv is not what `make install` makes here; run `make install` first")
    return clone


@pytest.mark.slow
def test_every_documented_command_runs_as_written(clean_clone: Path) -> None:
    """README.md, then docs/*.md: every sh, bash and python block not marked
    `<!-- docs-test: skip (why) -->` runs as written, in order, in a clean clone on the tiny preset."""
    env = {**os.environ, "PYTHONPATH": str(clean_clone)}
    env.pop("VIRTUAL_ENV", None)
    failures = []
    for page in PAGES:
        if not any(b.skip is None for b in code_blocks(page)):
            continue
        script = page_script(page, clean_clone, free_port(), timeout_s=PAGE_TIMEOUT_S)
        proc = subprocess.Popen(
            ["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=PAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            failures.append(f"{page.name}: over {PAGE_TIMEOUT_S} s\n{out[-3000:]}")
            continue
        if proc.returncode != 0:
            ran = re.findall(r"docs-test: run (\S+)", out)
            failures.append(f"{ran[-1] if ran else page.name}: exit {proc.returncode}\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)


def test_a_failing_block_fails_its_page_and_a_marked_one_does_not(tmp_path: Path) -> None:
    """The runner's negative control: an unmarked block that fails stops the page with its name; the
    same block marked skip is only named; variables carry from block to block."""
    page = tmp_path / "docs" / "p.md"
    page.parent.mkdir()
    marked = "<!-- docs-test: skip (fails on purpose) -->\n```sh\nexit 3\n```\n"
    page.write_text("# P\n```sh\nX=1\n```\n" + marked + '```sh\ntest "$X" = 1\nfalse\n```\n')
    run = subprocess.run(
        ["bash", "-c", page_script(page, tmp_path, 8000, 60)], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert re.findall(r"docs-test: run (\S+)", run.stderr) == ["docs/p.md:2", "docs/p.md:9"]
    assert "docs-test: skip docs/p.md:6 (fails on purpose)" in run.stderr
    page.write_text("# P\n```sh\nX=1\n```\n" + marked + '```sh\ntest "$X" = 1\n```\n')
    run = subprocess.run(
        ["bash", "-c", page_script(page, tmp_path, 8000, 60)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr

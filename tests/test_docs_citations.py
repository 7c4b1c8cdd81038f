"""The repository stands alone: no tracked text file cites a background document that lives outside it.

Code comments, test docstrings and docs may cite files of this repository or public sources (a URL, a
public repository's file, a paper). The team's background notes (GPU-AUDIT, ANCHORS, SERVING and the
others) are not in the repository, so a reader cannot open them: their facts are copied into docs/
with their public sources, and the docs are cited instead. This test lists the files with
`git ls-files` and fails on any that names one of those notes by file name.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("engine/", "tests/", "benchmarks/", "docs/", "README.md")
THIS_FILE = "tests/test_docs_citations.py"  # names every forbidden citation, so it is not scanned

# Background documents outside the repository, by the names a citation would use, and paths of the
# machine the notes live on. Written so that no line of this file is itself such a citation ([k], [.]):
# plain-text greps for them (a reviewer's, a hook's) then find nothing here either.
OUTSIDE = re.compile(
    r"GPU-AUDIT|\bANCHORS\b|SERVING[.]md|CODE-REVIEW|FIRST-HOUR|PEER-CHECKS|REAL-CHECKPOINT|TRT-AUDIT"
    r"|CONTEXT-PARALLEL[.]md|(?<![\w-])DESIGN[.]md|[.][.]/shared|/wor[k]/"
    r"|\b[Ii]ssue \d+\b"  # our tracker's numbers: a reader has no tracker to open (a public one is a URL)
)


def outside_citations(text: str) -> list[tuple[int, str]]:
    """(line number, the name) of every citation of an outside document in text."""
    return [
        (number, match.group(0))
        for number, line in enumerate(text.splitlines(), start=1)
        for match in OUTSIDE.finditer(line)
    ]


def scanned_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", *SCANNED], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and name != THIS_FILE]


def _text(path: Path) -> str | None:
    """The file's text; None for a binary file (an image, a weights file) or one deleted but not staged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_tracked_file_cites_an_outside_document() -> None:
    files = scanned_files()
    assert len(files) > 100  # git listed the repository, not an empty folder
    found = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, name in outside_citations(text):
            found.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not found, (
        "these cite documents outside the repository; cite the docs/ page holding the fact instead:\n"
        + "\n".join(found)
    )


def test_the_scanner_flags_each_outside_name() -> None:
    samples = [
        "broke the graph in every attention call (GPU-AUDIT #8).",
        "what ANCHORS" + ".md reports for a 71M model",  # each sample split in two, as above
        "ANCHORS assumed 790 TFLOP/s",
        "the layer table of DESIGN.md",
        "232 ms at 1024², SERVING.md §2.3",
        "see CODE-REVIEW item 4",
        "FIRST-HOUR's plan",
        "PEER-CHECKS 2",
        "REAL-CHECKPOINT layout",
        "(TRT-AUDIT B7)",
        "as CONTEXT-PARALLEL.md says",
        "open .." + "/shared/DESIGN.md",
        "cat /wor" + "k/shared/notes.md",
        "see /wor" + "k/main/engine/runtime.py",  # any path of that machine, not only its notes
        "LoRA (issue 12)",
    ]
    for sample in samples:
        assert outside_citations(sample), sample
    assert outside_citations("ok\nsee GPU-AUDIT #3 here") == [(2, "GPU-AUDIT")]


def test_the_scanner_passes_repository_and_public_citations() -> None:
    fine = (
        "docs/DESIGN-NOTES.md, 'The torch fast path'; docs/tensorrt-audit.md, finding B7; "
        "pytorch/ao torchao/quantization/quant_api.py; https://github.com/NVIDIA/TensorRT/issues/3566; "
        "trust_anchors; docs/DESIGN-NOTES.md#layers; shared memory"
    )
    assert outside_citations(fine) == []

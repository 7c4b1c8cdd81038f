"""One set of prompt rules (engine/prompts.py) for the CLI, the Python API (EditRequest) and both HTTP
APIs: the same prompts refused with the same one-line message everywhere (an empty or blank prompt, one
over MAX_PROMPT_CHARS, a missing one), and the longest allowed prompt accepted. The servers here run
over an editor that fails the test if a refused prompt ever reaches it (no model is loaded)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.assets import sample_image_path
from engine.errors import ConfigError
from engine.prompts import MAX_PROMPT_CHARS, check_prompt
from engine.request import EditRequest
from engine.serve.editor import EditJob, EditOutput
from tests.serve_harness import SAMPLE, SAMPLE_B64, Running, serve

BLANK, LONG, LONGEST = "  \t ", "x" * (MAX_PROMPT_CHARS + 1), "x" * MAX_PROMPT_CHARS


def message(prompt: object) -> str:
    with pytest.raises(ConfigError) as e:
        check_prompt(prompt)
    return str(e.value)


class NoEngine:
    """An editor whose edit fails the test: a refused prompt must never reach the engine."""

    family, review, default_steps = "tiny", False, 1

    def edit(self, job: EditJob) -> EditOutput:
        raise AssertionError(f"prompt {job.params.prompt[:20]!r} reached the engine")

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve(Path(tmp_path_factory.mktemp("prompts")), NoEngine) as running:
        yield running


def test_the_rules() -> None:
    assert check_prompt(LONGEST) == LONGEST and check_prompt("a hat") == "a hat"
    assert (
        message("") == message(BLANK) == "the prompt is empty: say what to change, e.g. 'add a small red hat'"
    )
    assert (
        message(LONG)
        == f"the prompt is {MAX_PROMPT_CHARS + 1} characters, over the limit of {MAX_PROMPT_CHARS}: "
        "shorten it"
    )
    assert message(None).startswith("a prompt is required")
    assert message(3) == "prompt must be a string, got int"


@pytest.mark.parametrize("prompt", [BLANK, LONG])
def test_edit_request_and_the_cli_refuse_with_the_same_words(prompt: str) -> None:
    with pytest.raises(ConfigError) as e:
        EditRequest.of(SAMPLE, prompt)
    assert str(e.value) == message(prompt)
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "edit", str(sample_image_path()), prompt],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip() == f"kontext edit: error: {message(prompt)}"
    assert EditRequest.of(SAMPLE, LONGEST).prompt == LONGEST  # the limit itself is allowed


@pytest.mark.parametrize("prompt", [BLANK, LONG])
def test_both_http_apis_refuse_with_the_same_words(server: Running, prompt: str) -> None:
    with server.client() as c:
        r = c.post("/v1/edit", files={"image": ("in.png", SAMPLE, "image/png")}, data={"prompt": prompt})
        assert r.status_code == 422 and r.json()["detail"] == message(prompt)
        r = c.post(
            "/v1/images/edits", files={"image": ("in.png", SAMPLE, "image/png")}, data={"prompt": prompt}
        )
        error = r.json()["error"]
        assert r.status_code == 400 and error["message"] == message(prompt) and error["param"] == "prompt"
        r = c.post("/v1/flux-kontext-dev", json={"prompt": prompt, "input_image": SAMPLE_B64})
        assert r.status_code == 422  # BFL's JSON: a blank prompt by check_prompt, a long one by its schema
        if prompt == BLANK:
            assert r.json()["detail"] == message(prompt)


def test_a_missing_prompt_is_refused_by_both_http_apis(server: Running) -> None:
    with server.client() as c:
        r = c.post("/v1/images/edits", files={"image": ("in.png", SAMPLE, "image/png")})
        assert r.status_code == 400 and r.json()["error"]["message"] == message(None)
        assert c.post("/v1/flux-kontext-dev", json={"input_image": SAMPLE_B64}).status_code == 422
        assert c.post("/v1/edit", files={"image": ("in.png", SAMPLE, "image/png")}).status_code == 422

"""OpenAI's images/edits on `kontext serve`, driven by the official `openai` SDK, unchanged, against a
live server on 127.0.0.1 (the tiny engine with the blocklist checker): images come back and decode,
`n` images for `n`, references as `image[]`, URLs, and the SDK's own exceptions for a wrong key, a
bad image, a moderated prompt and a full queue, each carrying OpenAI's error fields."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from engine.buckets import nearest_bucket
from engine.images import SOFTWARE_KEY
from engine.serve.editor import Editor, LocalEditor
from tests.serve_harness import SAMPLE, GatedEditor, Running, serve, tiny_editor

openai = pytest.importorskip("openai")

BUCKET = nearest_bucket(451, 300, "tiny")  # the sample's bucket in the tiny family
BLOCKED = "forbiddenword"


@pytest.fixture(scope="module")
def blocklist_editor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Editor]:
    """The tiny engine with the real blocklist checker (engine.safety.blocklist)."""
    from engine import load
    from engine.safety.policy import build_policy

    terms = Path(tmp_path_factory.mktemp("safety")) / "blocklist.txt"
    terms.write_text(f"{BLOCKED}\n")
    kontext = load("tiny", device="cpu", workers=2, safety=build_policy("blocklist", blocklist=terms))
    kontext.warmup()
    yield LocalEditor(kontext, owned=False)
    kontext.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, blocklist_editor: Editor) -> Iterator[Running]:
    folder = Path(tmp_path_factory.mktemp("openai"))
    with serve(folder, lambda: blocklist_editor, max_body_bytes=2 * 1024 * 1024) as running:
        yield running


def client(server: Running, key: str = "alice") -> Any:
    api_key = server.keys.get(key, key)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_edit_returns_n_images_that_decode(server: Running) -> None:
    r = client(server).images.edit(image=("cat.png", SAMPLE, "image/png"), prompt="add a hat", n=2, model="x")
    assert isinstance(r.created, int) and r.created > 0
    assert len(r.data) == 2 and r.output_format == "png" and r.size == f"{BUCKET[0]}x{BUCKET[1]}"
    first, second = (decoded(d.b64_json) for d in r.data)
    assert first.size == second.size == BUCKET
    assert first.tobytes() != second.tobytes()  # seeds seed and seed + 1
    assert "AI" in first.info[SOFTWARE_KEY] and "prompt" not in first.info  # disclosed; prompt private
    assert all(v[:1] != "/" for v in first.info.values())  # no local path in the metadata


def test_size_references_jpeg_and_urls(server: Running) -> None:
    wide = nearest_bucket(1536, 1024, "tiny")
    r = client(server).images.edit(
        image=[("a.png", SAMPLE, "image/png"), ("ref.png", SAMPLE, "image/png")],  # sent as image[]
        prompt="put the cat beside the reference",
        size="1536x1024",
        output_format="jpeg",
        response_format="url",
    )
    assert len(r.data) == 1 and r.data[0].b64_json is None and r.output_format == "jpeg"
    fetched = httpx.get(r.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).size == wide


def test_wrong_key_is_authentication_error(server: Running) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, "kx_wrong").images.edit(image=("c.png", SAMPLE, "image/png"), prompt="snow")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert e.value.type == "invalid_request_error"


def test_bad_image_is_bad_request(server: Running) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(image=("c.png", b"\x89PNG not an image", "image/png"), prompt="snow")
    assert e.value.status_code == 400 and e.value.param == "image" and e.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(image=("c.png", SAMPLE, "image/png"), prompt="snow", size="huge")
    assert e.value.param == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(image=("c.png", SAMPLE, "image/png"), prompt="snow", n=11)
    assert e.value.param == "n"


def test_moderated_prompt_is_bad_request_with_moderation_code(server: Running) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(image=("c.png", SAMPLE, "image/png"), prompt=f"add a {BLOCKED} hat")
    assert e.value.status_code == 400 and e.value.code == "moderation_blocked"
    assert "safety system" in e.value.message


def test_full_queue_is_rate_limit_error_with_retry_after(tmp_path: Path) -> None:
    gated = GatedEditor(tiny_editor())
    with serve(tmp_path, lambda: gated, queue=1) as s, s.client() as bfl:
        from tests.serve_harness import SAMPLE_B64

        held = bfl.post("/v1/flux-kontext-dev", json={"prompt": "hat", "input_image": SAMPLE_B64})
        assert held.status_code == 200  # the one slot, held by the gate
        with pytest.raises(openai.RateLimitError) as e:
            client(s).images.edit(image=("c.png", SAMPLE, "image/png"), prompt="snow")
        assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
        assert int(e.value.response.headers["retry-after"]) >= 1
        gated.gate.set()


def test_every_error_is_openai_shaped(server: Running) -> None:
    with server.client() as c:
        too_big = c.post("/v1/images/edits", content=b"x" * (3 * 1024 * 1024))

        def chunks() -> Iterator[bytes]:  # a file part that never ends, sent without a Content-Length
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            yield from (b"x" * (64 * 1024) for _ in range(40))

        chunked = c.post(
            "/v1/images/edits", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        no_image = c.post("/v1/images/edits", data={"prompt": "snow"})
        masked = c.post(
            "/v1/images/edits",
            files={"image": ("c.png", SAMPLE, "image/png"), "mask": ("m.png", SAMPLE, "image/png")},
            data={"prompt": "snow"},
        )
    assert [r.status_code for r in (too_big, chunked, no_image, masked)] == [413, 413, 400, 400]
    for r in (too_big, chunked, no_image, masked):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert no_image.json()["error"]["param"] == "image" and masked.json()["error"]["param"] == "mask"

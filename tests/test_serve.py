"""`kontext serve` over a real uvicorn on 127.0.0.1: BFL's submit -> poll -> fetch, the multipart
route, auth and isolation between keys, every refusal a 4xx with a JSON detail, the hostile-image
corpus over HTTP, overload at 4x the queue bound, review, moderation, TTL expiry and metrics."""

from __future__ import annotations

import base64
import io
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from engine.buckets import nearest_bucket
from engine.errors import ModeratedError
from engine.safety import Verdict
from engine.serve.editor import EditJob, Editor, EditOutput
from tests.serve_harness import SAMPLE, SAMPLE_B64, GatedEditor, Running, poll, serve, tiny_editor
from tests.test_images import encode, noise_image, png_chunk, png_header_only

BUCKET = nearest_bucket(451, 300, "tiny")  # the sample's output size: (160, 96)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Running:
    with serve(tmp_path_factory.mktemp("serve"), tiny_editor, max_body_bytes=2 * 1024 * 1024) as running:
        yield running


def submit(client: httpx.Client, route: str = "/v1/flux-kontext-dev", **body: object) -> httpx.Response:
    return client.post(route, json={"prompt": "add a red hat", "input_image": SAMPLE_B64, **body})


# ---------------------------------------------------------------------------- BFL's flow


def test_samples_disclose_ai_generation_and_keep_the_prompt_private(server: Running) -> None:
    with server.client() as c:
        done = poll(c, submit(c, seed=4).json()["id"])
        png = Image.open(io.BytesIO(c.get(done["result"]["sample"]).content))
        text = dict(png.text)  # type: ignore[attr-defined]
        assert "AI generated" in text["Software"] and text["model"] == "tiny"
        assert text["seed"] == "4"
        assert "prompt" not in text and "add a red hat" not in repr(text)


def test_a_result_is_the_next_edits_input_for_its_own_key_only(server: Running) -> None:
    with server.client() as c:
        first = poll(c, submit(c, seed=5).json()["id"])
        assert first["status"] == "Ready"
        r = submit(c, seed=6, input_image=f"result:{first['id']}")
        assert r.status_code == 200, r.text
        second = poll(c, r.json()["id"])
        assert second["status"] == "Ready"
        assert c.get(second["result"]["sample"]).content != c.get(first["result"]["sample"]).content
        r = submit(c, input_image="result:no-such-task")
        assert r.status_code == 422 and "no Ready result" in r.json()["detail"]
    with server.client("bob") as other:
        r = submit(other, input_image=f"result:{first['id']}")
        assert r.status_code == 422, r.text  # another key's result is not found


def test_reference_images_are_edited_with(server: Running) -> None:
    """input_image_2..3 reach the engine as references: a different result from the same seed without them."""
    with server.client() as c:
        plain = poll(c, submit(c, seed=3).json()["id"])
        with_refs = poll(
            c, submit(c, seed=3, input_image_2=SAMPLE_B64, input_image_3=SAMPLE_B64).json()["id"]
        )
        assert plain["status"] == with_refs["status"] == "Ready", (plain, with_refs)
        a = c.get(plain["result"]["sample"]).content
        b = c.get(with_refs["result"]["sample"]).content
        assert Image.open(io.BytesIO(a)).size == Image.open(io.BytesIO(b)).size
        assert a != b


def test_submit_poll_fetch(server: Running) -> None:
    with server.client() as c:
        r = submit(c, seed=7)
        assert r.status_code == 200, r.text
        task = r.json()
        assert set(task) == {"id", "polling_url"}
        assert task["polling_url"] == f"{server.url}/v1/get_result?id={task['id']}"
        body = c.get(task["polling_url"]).json()
        assert body["status"] in ("Pending", "Ready")
        body = poll(c, task["id"])
        assert body["status"] == "Ready", body
        result = body["result"]
        assert result["prompt"] == "add a red hat" and result["seed"] == 7
        assert result["end_time"] >= result["start_time"] and result["duration"] >= 0
        assert {"queue_wait", "service", "denoise", "vae_decode"} <= set(result["timings"])
        sample = httpx.get(result["sample"])  # the URL is the credential: no X-Key
        assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(sample.content)).size == BUCKET


def test_pro_alias_aspect_ratio_and_jpeg(server: Running) -> None:
    with server.client() as c:
        r = submit(c, "/v1/flux-kontext-pro", aspect_ratio="1:1", output_format="jpeg", seed=None, steps=None)
        assert r.status_code == 200, r.text
        body = poll(c, r.json()["id"])
        assert body["status"] == "Ready"
        sample = httpx.get(body["result"]["sample"])
        assert sample.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(sample.content))
        assert image.format == "JPEG" and image.size == nearest_bucket(1, 1, "tiny")
        assert isinstance(body["result"]["seed"], int)  # a seed was drawn and is reported


def test_a_data_url_gives_the_image_of_plain_base64(server: Running) -> None:
    """The same input sent as plain base64 and as a data: URL, same seed: the same bytes."""
    with server.client() as c:
        a = submit(c, seed=3).json()["id"]
        b = c.post(
            "/v1/flux-kontext-dev",
            json={"prompt": "add a red hat", "input_image": "data:image/png;base64," + SAMPLE_B64, "seed": 3},
        ).json()["id"]
        samples = [httpx.get(poll(c, i)["result"]["sample"]).content for i in (a, b)]
        assert samples[0] == samples[1]


def test_multipart_sync_route(server: Running) -> None:
    with server.client() as c:
        r = c.post(
            "/v1/edit",
            files={"image": ("cat.png", SAMPLE, "image/png")},
            data={"prompt": "snow", "seed": "1"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == BUCKET
        assert poll(c, r.headers["x-task-id"])["status"] == "Ready"  # it is a task like any other


# ---------------------------------------------------------------------------- auth


def test_auth_refusals_and_isolation(server: Running) -> None:
    with server.client(None) as anon:
        r = submit(anon)
        assert r.status_code == 401 and "X-Key" in r.json()["detail"]
        assert (
            anon.get("/v1/get_result", params={"id": "x"}, headers={"X-Key": "kx_wrong"}).status_code == 401
        )
    with server.client("alice") as alice, server.client("bob") as bob:
        job = submit(alice).json()["id"]
        assert bob.get("/v1/get_result", params={"id": job}).json() == {
            "id": job,
            "status": "Task not found",
            "result": None,
            "progress": None,
            "details": None,
        }
        assert poll(alice, job)["status"] == "Ready"
        assert bob.get("/v1/get_result", params={"id": job}).json()["status"] == "Task not found"
        assert alice.get("/v1/get_result", params={"id": "no-such-task"}).json()["status"] == "Task not found"
        assert bob.get("/v1/review").status_code == 403  # review needs an admin key
    with server.client("admin") as admin:
        assert admin.get("/v1/review").json() == []


def test_no_auth_only_on_loopback() -> None:
    from engine.errors import ConfigError
    from engine.serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="loopback"):
        ServeSettings(host="0.0.0.0", keys_file=None)
    assert ServeSettings(host="::1", keys_file=None).keys_file is None  # allowed on loopback


# ---------------------------------------------------------------------------- refusals


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hostile_corpus() -> dict[str, str]:
    """tests/test_images.py's hostile files, as base64 fields (plus encodings only HTTP has)."""
    png = encode(noise_image(128, 96), "PNG")
    jpeg = encode(noise_image(128, 96), "JPEG")
    valid = encode(noise_image(8, 8), "PNG")
    ztxt = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * (16 << 20), 9))
    files = {
        "empty": b"",
        "text": b"hello, this is not an image\n",
        "truncated png": png[: len(png) // 2],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "81 MP header": png_header_only(9000, 9000),
        "10 GP header": png_header_only(100_000, 100_000),
        "zTXt bomb": valid[:33] + ztxt + valid[33:],
        "5000 JPEG scans": b"\xff\xd8\xff\xe0" + b"\xff\xda\x00\x08" * 5000 + b"\xff\xd9",
        "gif": encode(noise_image(16, 16), "GIF"),
        "bmp": encode(noise_image(16, 16), "BMP"),
        "tiff": encode(noise_image(16, 16), "TIFF"),
    }
    fields = {name: b64(data) for name, data in files.items()}
    fields |= {
        "not base64": "%%%not base64%%%",
        "data URL not base64": "data:image/png,rawbytes",
        "http URL (not allowed)": "http://127.0.0.1:9/cat.png",
    }
    return fields


def test_hostile_images_over_http(server: Running) -> None:
    corpus = hostile_corpus()
    with server.client() as c:
        for name, field in corpus.items():
            r = submit(c, input_image=field)
            assert r.status_code == 422, (name, r.status_code, r.text[:200])
            assert "input_image" in r.json()["detail"], name
        for name in ("empty", "truncated png", "81 MP header", "gif"):
            data = base64.b64decode(corpus[name])
            r = c.post("/v1/edit", files={"image": ("x.png", data, "image/png")}, data={"prompt": "p"})
            assert r.status_code == 422 and r.json()["detail"].startswith("image:"), name
        assert c.get("/readyz").status_code == 200
        assert poll(c, submit(c).json()["id"])["status"] == "Ready"  # still serving


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt_upsampling": True}, "prompt_upsampling"),
        ({"input_image_2": "bm90IGFuIGltYWdl"}, "input_image_2"),
        ({"webhook_url": "http://127.0.0.1:9/hook"}, "--allow-webhooks"),
        ({"input_image": None}, "input_image is required"),
        ({"aspect_ratio": "30:1"}, "aspect_ratio"),
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"guidance": 10.5}, "guidance"),
        ({"seed": -1}, "seed"),
        ({"prompt": "x" * 4097}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"output_format": "webp"}, "output_format"),
        ({"safety_tolerance": 7}, "safety_tolerance"),
    ],
)
def test_bad_fields_are_422_with_detail(server: Running, body: dict[str, object], needle: str) -> None:
    with server.client() as c:
        r = submit(c, **body)
        assert r.status_code == 422, r.text
        assert needle in str(r.json()["detail"])
        assert SAMPLE_B64[:100] not in r.text  # the input is never echoed back


def test_malformed_bodies(server: Running) -> None:
    with server.client() as c:
        for content in (b"{", b"[]", b'"x"', b"\xff\xfe", b'{"prompt": 5}'):
            r = c.post("/v1/flux-kontext-dev", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "detail" in r.json(), content
        r = c.post("/v1/flux-kontext-dev", content=b"x" * (3 * 1024 * 1024))
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks() -> object:
            for _ in range(40):
                yield b"x" * (64 * 1024)

        r = c.post("/v1/flux-kontext-dev", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413  # chunked: counted while read
        assert c.get("/v1/get_result").status_code == 422  # id missing
        assert c.get("/v1/samples/nope.png").status_code == 404


# ---------------------------------------------------------------------------- overload, readiness


def test_overload_only_200_and_429_and_every_accepted_job_ends_ready(tmp_path: Path) -> None:
    gated = GatedEditor(tiny_editor())
    with serve(tmp_path, lambda: gated, queue=4, per_key=4) as s, s.client() as c:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda _: submit(c), range(16)))  # 4x the bound, all at once
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * 4 + [429] * 12
        refused = [r for r in responses if r.status_code == 429]
        assert all(int(r.headers["retry-after"]) >= 1 and "in flight" in r.json()["detail"] for r in refused)
        gated.gate.set()
        accepted = [r.json()["id"] for r in responses if r.status_code == 200]
        assert [poll(c, i)["status"] for i in accepted] == ["Ready"] * 4
        metrics = c.get("/metrics").text
        assert 'kontext_rejections_total{reason="queue_full"} 12.0' in metrics
        assert 'kontext_jobs_finished_total{status="Ready"} 4.0' in metrics
        assert "kontext_dispatch_hits" in metrics and "kontext_queue_depth 0.0" in metrics
        assert 'kontext_service_seconds_count{stage="denoise"} 4.0' in metrics


def test_per_key_limit(tmp_path: Path) -> None:
    gated = GatedEditor(tiny_editor())
    with (
        serve(tmp_path, lambda: gated, queue=8, per_key=2) as s,
        s.client("alice") as a,
        s.client("bob") as b,
    ):
        assert [submit(a).status_code for _ in range(3)] == [200, 200, 429]
        assert "per-key" in submit(a).json()["detail"]
        assert submit(b).status_code == 200  # another key still gets in
        gated.gate.set()


def test_a_key_over_its_limit_gets_429_before_its_image_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/serving.md's promise, on every submitting route: the per-key limit is checked before the
    base64 or the image is decoded. Negative control: another key's requests are decoded."""
    import engine.serve.api_bfl as api_bfl
    import engine.serve.api_openai as api_openai

    decoded: list[str] = []

    def spy(name: str, real: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            decoded.append(name)
            return real(*args, **kwargs)  # type: ignore[operator]

        return call

    monkeypatch.setattr(api_bfl, "image_bytes", spy("base64", api_bfl.image_bytes))
    monkeypatch.setattr(api_bfl, "load_image", spy("multipart", api_bfl.load_image))
    monkeypatch.setattr(api_openai, "load_image", spy("openai", api_openai.load_image))
    gated = GatedEditor(tiny_editor())
    files = {"image": ("cat.png", SAMPLE, "image/png")}
    with serve(tmp_path, lambda: gated, queue=8, per_key=1, sync_timeout=0.5) as s, s.client("alice") as a:
        assert submit(a).status_code == 200
        decoded.clear()
        over = [
            submit(a),
            a.post("/v1/edit", files=files, data={"prompt": "snow"}),
            a.post("/v1/images/edits", files=files, data={"prompt": "snow"}),
        ]
        assert [r.status_code for r in over] == [429, 429, 429], [r.text for r in over]
        assert all("per-key" in r.text for r in over) and decoded == []
        with s.client("bob") as b:
            assert b.post("/v1/edit", files=files, data={"prompt": "snow"}).status_code == 202  # waits 0.5 s
        assert decoded == ["multipart"]
        gated.gate.set()


def test_readiness_follows_the_engine(tmp_path: Path) -> None:
    loaded = GatedEditor(tiny_editor())

    def slow_load() -> Editor:
        loaded.gate.wait(30)
        return loaded.inner

    with serve(tmp_path, slow_load, wait_ready=False) as s, s.client() as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "warming up" in r.json()["detail"]
        r = submit(c)
        assert r.status_code == 503 and r.headers["retry-after"]
        loaded.gate.set()
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert submit(c).status_code == 200
        s.service.begin_drain()  # SIGTERM's first step: polls go on, submits are refused
        assert submit(c).status_code == 503 and c.get("/readyz").status_code == 503


# ---------------------------------------------------------------------------- safety and review


class BlocklistEditor:
    """The real editor behind the safety contract (engine.errors.ModeratedError, engine.safety.Verdict),
    as the safety layer will raise it: "forbidden" in the prompt is a request verdict, "hide" in the
    prompt flags the output."""

    def __init__(self, inner: Editor) -> None:
        self.inner, self.family, self.review = inner, inner.family, inner.review
        self.default_steps = inner.default_steps

    def edit(self, job: EditJob) -> EditOutput:
        if "forbidden" in job.params.prompt:
            raise ModeratedError("request", Verdict("blocklist", True, "blocked term 'forbidden'"))
        out = self.inner.edit(job)
        if "hide" in job.params.prompt:
            raise ModeratedError("content", Verdict("nsfw", True, "score 0.93 >= 0.85", {"nsfw": 0.93}))
        return out

    def stats(self) -> dict[str, int]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def test_moderation_statuses_store_no_image(tmp_path: Path) -> None:
    with serve(tmp_path, lambda: BlocklistEditor(tiny_editor())) as s, s.client() as c:
        request = poll(c, submit(c, prompt="a forbidden hat").json()["id"])
        content = poll(c, submit(c, prompt="hide it").json()["id"])
        assert request["status"] == "Request Moderated" and request["result"] is None
        assert request["details"] == {
            "stage": "request",
            "checker": "blocklist",
            "reason": "blocked term 'forbidden'",
        }
        assert content["status"] == "Content Moderated" and content["details"]["checker"] == "nsfw"
        assert list((tmp_path / "data" / "results").iterdir()) == []  # nothing written
        r = c.post("/v1/edit", files={"image": ("c.png", SAMPLE, "image/png")}, data={"prompt": "forbidden"})
        assert r.status_code == 422 and "Request Moderated" in r.json()["detail"]


def test_review_holds_results_until_approved(tmp_path: Path) -> None:
    with serve(tmp_path, tiny_editor, review=True) as s, s.client() as c, s.client("admin") as admin:
        a, b = submit(c).json()["id"], submit(c).json()["id"]
        deadline = time.monotonic() + 60
        while len(admin.get("/v1/review").json()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = c.get("/v1/get_result", params={"id": a}).json()
        assert held["status"] == "Pending" and held["details"] == {"review": "awaiting review"}
        assert held["result"] is None
        assert [i["id"] for i in admin.get("/v1/review").json()] == [a, b]
        assert admin.get(f"/v1/review/{a}/image").headers["content-type"] == "image/png"
        assert c.post(f"/v1/review/{a}/approve").status_code == 403  # not an admin key
        assert admin.post(f"/v1/review/{a}/approve").json()["status"] == "Ready"
        assert admin.post(f"/v1/review/{b}/reject").json()["status"] == "Content Moderated"
        assert admin.post(f"/v1/review/{b}/approve").status_code == 404  # no longer held
        ready = c.get("/v1/get_result", params={"id": a}).json()
        assert httpx.get(ready["result"]["sample"]).status_code == 200
        assert c.get("/v1/get_result", params={"id": b}).json()["status"] == "Content Moderated"


# ---------------------------------------------------------------------------- expiry, keys


def test_results_expire_after_the_ttl(tmp_path: Path) -> None:
    ttl = 3.0  # long enough for the first fetch on a loaded machine (1 s was not)
    with serve(tmp_path, tiny_editor, result_ttl=ttl) as s, s.client() as c:
        body = poll(c, submit(c).json()["id"])
        assert httpx.get(body["result"]["sample"]).status_code == 200
        time.sleep(ttl + 0.1)
        assert httpx.get(body["result"]["sample"]).status_code == 404  # expired, even before the reaper
        deadline = time.monotonic() + 10
        while c.get("/v1/get_result", params={"id": body["id"]}).json()["status"] != "Task not found":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert list((tmp_path / "data" / "results").iterdir()) == []  # the reaper deleted the file


def test_keys_file_holds_only_hashes(tmp_path: Path) -> None:
    from engine.cli import main
    from engine.serve.keys import KeyRing, digest

    path = tmp_path / "keys.jsonl"
    assert main(["keys", "new", "--file", str(path), "--name", "ci"]) == 0
    assert main(["keys", "new", "--file", str(path), "--admin"]) == 0
    text = path.read_text()
    assert "kx_" not in text and len(text.splitlines()) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    ring = KeyRing.load(path)
    assert len(ring) == 2 and ring.find("kx_nope") is None
    line = text.splitlines()[0]
    assert digest("x") not in line


# ---------------------------------------------------------------------------- webhooks, URLs


@dataclass
class Post:
    path: str
    body: dict[str, Any]
    secret: str | None


@contextmanager
def webhook_receiver(answer_after_s: float = 0.0) -> Iterator[tuple[str, list[Post]]]:
    """An HTTP receiver on 127.0.0.1 (its base URL, and the posts it has answered, in order); each post
    is recorded and answered 204 after `answer_after_s` seconds."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[Post] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            time.sleep(answer_after_s)
            received.append(Post(self.path, body, self.headers.get("x-webhook-secret")))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{hook.server_address[1]}", received
    finally:
        hook.shutdown()


def test_webhook_called_and_private_urls_refused(tmp_path: Path) -> None:
    with (
        webhook_receiver() as (base, received),
        serve(tmp_path, tiny_editor, allow_webhooks=True, allow_urls=True) as s,
        s.client() as c,
    ):
        job = submit(c, webhook_url=f"{base}/done", webhook_secret="s3cret").json()["id"]
        assert poll(c, job)["status"] == "Ready"
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        post = received[0]
        assert (post.path, post.secret) == ("/done", "s3cret")
        assert post.body["id"] == job and post.body["status"] == "Ready"
        r = submit(c, input_image=f"{base}/cat.png")
        assert r.status_code == 422 and "non-public address" in r.json()["detail"]
        assert submit(c, webhook_url="ftp://example.com/x").status_code == 422


def test_a_stopping_server_sends_the_webhooks_of_the_jobs_it_finished(tmp_path: Path) -> None:
    """A drain ends with the last jobs' webhooks delivered: the server waits for posts in flight (a slow
    receiver here: it answers after 1 s) before it exits, instead of dropping them with the process."""
    with webhook_receiver(answer_after_s=1.0) as (base, received):
        with serve(tmp_path, tiny_editor, allow_webhooks=True) as s, s.client() as c:
            job = submit(c, webhook_url=f"{base}/last").json()["id"]
            assert poll(c, job)["status"] == "Ready"
            assert s.service.drain(30)  # the job has ended and its post has started
        assert [p.path for p in received] == ["/last"]  # the shutdown waited (without the wait: [])


def test_engine_review_policy_holds_results(tmp_path: Path) -> None:
    """An engine whose safety policy asks for review (SafetyPolicy.review) holds results even when the
    server was not started with --review."""

    def reviewed() -> Editor:
        editor = tiny_editor()
        editor.review = True  # as LocalEditor reads it from engine.safety.review
        return editor

    with serve(tmp_path, reviewed) as s, s.client() as c, s.client("admin") as admin:
        job = submit(c).json()["id"]
        deadline = time.monotonic() + 60
        while not admin.get("/v1/review").json() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v1/get_result", params={"id": job}).json()["details"] == {"review": "awaiting review"}
        assert admin.post(f"/v1/review/{job}/approve").json()["status"] == "Ready"


# ---------------------------------------------------------------------------- no local paths


def test_no_response_reveals_a_local_path(tmp_path: Path) -> None:
    """Engine errors often name files (a plan, a manifest, a rebuild hint); clients get the last part only."""
    from engine.errors import KontextError, ManifestError
    from engine.serve.service import public

    secret = "/home/ops/builds/kontext-h100"

    class Failing:
        family, review, default_steps = "tiny", False, 1

        def edit(self, job: EditJob) -> EditOutput:
            raise KontextError(
                f"no plan for this shape in {secret}/plans/160x96.plan; rebuild with --out {secret}"
            )

        def stats(self) -> dict[str, int]:
            return {}

        def close(self) -> None:
            pass

    def broken() -> Editor:
        raise ManifestError(f"{secret}/manifest.json: unreadable")

    with serve(tmp_path / "a", Failing) as s, s.client() as c:
        body = poll(c, submit(c).json()["id"])
        assert body["status"] == "Error" and "/home/ops" not in str(body)
        assert body["details"]["error"] == (
            "no plan for this shape in .../160x96.plan; rebuild with --out .../kontext-h100"
        )
    with serve(tmp_path / "b", broken, wait_ready=False) as s, s.client() as c:
        deadline = time.monotonic() + 10
        while "failed" not in (c.get("/readyz").json()["detail"] or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        detail = c.get("/readyz").json()["detail"]
        assert detail == "the engine failed to load: ManifestError: .../manifest.json: unreadable"
    # URLs, ratios and relative words are left alone
    kept = "fetch http://example.com/a/b.png at 16:9, 1/2 of input/output"
    assert public(kept) == kept and public("see ./build/x/manifest.json") == "see .../manifest.json"


def test_job_params_round_trip_through_the_row() -> None:
    """JobParams is stored as JSON and read back equal; a row written by an older server (a plain dict,
    size as a list, keys this version dropped) still loads, with the defaults it lacked."""
    import json

    from engine.config import DEFAULT_GUIDANCE
    from engine.serve.params import JobParams, job_params

    made = job_params("snow", size=(160, 96), num_images=3, base="http://x")
    assert made.steps is None and made.guidance == DEFAULT_GUIDANCE and 0 <= made.seed < 2**31
    assert JobParams.from_json(made.to_json()) == made
    old = {"prompt": "hat", "seed": 3, "steps": 28, "guidance": 2.5, "size": [1024, 1024], "extra": 1}
    loaded = JobParams.from_json(json.dumps(old))
    assert loaded.size == (1024, 1024) and loaded.num_images == 1 and loaded.output_format == "png"
    # every JobParams field is a job_params keyword by its own name; an unknown one is refused
    from dataclasses import fields

    every = {f.name: getattr(made, f.name) for f in fields(JobParams) if f.name != "prompt"}
    assert job_params("snow", **every) == made
    with pytest.raises(TypeError, match="nmu_images"):
        job_params("snow", nmu_images=2)


def test_job_params_to_request_carries_every_edit_field() -> None:
    """JobParams.to_request is the one mapping to EditRequest: each shared field arrives with its value,
    and an EditRequest field the server does not carry must be named here (a new edit option is a
    JobParams field of the same name, or a line below saying why the server does not offer it)."""
    from dataclasses import fields

    from engine.request import EditRequest
    from engine.serve.params import EDIT_FIELDS, JobParams, job_params

    not_served = {"image", "references", "placement"}  # the input files travel beside the params
    not_served.add("cache")  # neither API has the field: the server's --cache is every job's (engine default)
    wanted = {f.name for f in fields(EditRequest)} - not_served - {"prompt"}
    assert set(EDIT_FIELDS) == wanted
    params = job_params("snow", seed=5, steps=3, guidance=4.0, size=(160, 96), num_images=2)
    request = params.to_request(SAMPLE, (SAMPLE,))
    assert (request.prompt, request.seed, request.steps, request.guidance) == ("snow", 5, 3, 4.0)
    assert (request.size, request.num_images) == ((160, 96), 2)
    assert request.image.size == (451, 300) and [r.size for r in request.references] == [(451, 300)]
    assert {n: getattr(request, n) for n in EDIT_FIELDS} == {n: getattr(params, n) for n in EDIT_FIELDS}
    assert isinstance(params, JobParams) and params.to_request(SAMPLE).references == ()


def test_sync_routes_answer_an_internal_error_500_and_a_bad_request_4xx(tmp_path: Path) -> None:
    """Both synchronous routes wait through one run_sync: a job the server failed (an exception that is
    not the engine's KontextError) is a 500 on BFL's /v1/edit and on OpenAI's images/edits; a job the
    request failed is BFL's 422 and OpenAI's 400. The server fills in the steps: --steps here (1)."""
    from engine.errors import KontextError

    seen: list[EditJob] = []

    class Failing:
        family, review, default_steps = "tiny", False, 8

        def edit(self, job: EditJob) -> EditOutput:
            seen.append(job)
            if job.params.prompt == "crash":
                raise RuntimeError("a bug")
            raise KontextError("this edit cannot run")

        def stats(self) -> dict[str, int]:
            return {}

        def close(self) -> None:
            pass

    with serve(tmp_path, Failing) as s, s.client() as c:
        image = {"image": ("c.png", SAMPLE, "image/png")}
        bfl = {p: c.post("/v1/edit", files=image, data={"prompt": p}) for p in ("crash", "refused")}
        oai = {p: c.post("/v1/images/edits", files=image, data={"prompt": p}) for p in ("crash", "refused")}
    assert (bfl["crash"].status_code, bfl["refused"].status_code) == (500, 422)
    assert "internal error: RuntimeError" in bfl["crash"].json()["detail"]
    assert (oai["crash"].status_code, oai["refused"].status_code) == (500, 400)
    assert oai["crash"].json()["error"]["message"] == "internal error: RuntimeError"
    assert oai["refused"].json()["error"]["message"] == "this edit cannot run"
    assert [job.params.steps for job in seen] == [1, 1, 1, 1]  # ServeSettings(default_steps=1)

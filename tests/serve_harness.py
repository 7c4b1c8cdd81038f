"""Test harness for the server: a real uvicorn on a free 127.0.0.1 port in a thread, over the tiny
preset's engine (loaded once per session), with bounded polling that stops by itself."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from engine import assets
from engine.serve.app import create_app
from engine.serve.editor import EditJob, Editor, EditOutput
from engine.serve.keys import KeyRing, new_key
from engine.serve.service import Service
from engine.serve.settings import ServeSettings
from tests.ports import free_port

FINAL = ("Ready", "Error", "Request Moderated", "Content Moderated", "Task not found")
SAMPLE = assets.sample_image_path().read_bytes()  # 451x300 PNG; the tiny family's bucket is 160x96
SAMPLE_B64 = base64.b64encode(SAMPLE).decode()


@dataclass
class Running:
    url: str
    service: Service
    keys: dict[str, str]  # name -> key

    def client(self, key: str | None = "alice", timeout: float = 30.0) -> httpx.Client:
        headers = {} if key is None else {"X-Key": self.keys[key]}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


class GatedEditor:
    """The real editor behind a gate the test opens: keeps jobs in flight deterministically."""

    def __init__(self, inner: Editor) -> None:
        self.inner = inner
        self.family, self.review, self.default_steps = inner.family, inner.review, inner.default_steps
        self.gate = threading.Event()

    def edit(self, job: EditJob) -> EditOutput:
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return self.inner.edit(job)

    def stats(self) -> dict[str, int]:
        return self.inner.stats()

    def close(self) -> None:
        self.gate.set()
        self.inner.close()


def make_keys(path: Path) -> tuple[Path, dict[str, str]]:
    keys = {
        "alice": new_key(path, "alice"),
        "bob": new_key(path, "bob"),
        "admin": new_key(path, "ops", admin=True),
    }
    return path, keys


@contextmanager
def serve(
    tmp: Path, editor: Callable[[], Editor], *, auth: bool = True, wait_ready: bool = True, **settings: Any
) -> Iterator[Running]:
    """A server on a free port; stops (and joins) on exit."""
    keys_file, keys = make_keys(tmp / "keys.jsonl") if auth else (None, {})
    port = free_port()
    s = ServeSettings(data=tmp / "data", port=port, keys_file=keys_file, default_steps=1, **settings)
    service = Service(s, editor)
    app = create_app(service, KeyRing.load(keys_file) if keys_file else None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # the first server of a process loads the engine (slow on a busy CPU)
    while True:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200 or (not wait_ready and r.status_code == 503):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start")
        time.sleep(0.05)
    try:
        yield Running(url, service, keys)
    finally:
        server.should_exit = True
        thread.join(30)


def poll(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """get_result until the status is final (or `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/v1/get_result", params={"id": job_id}).json()
        if body["status"] in FINAL or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


_engine: list[Any] = []


def tiny_editor() -> Editor:
    """The tiny preset's engine (loaded once per test process, 2 engine workers), not closed by servers."""
    from engine import load
    from engine.serve.editor import LocalEditor

    if not _engine:
        kontext = load("tiny", device="cpu", workers=2)
        kontext.warmup()
        _engine.append(kontext)
    return LocalEditor(_engine[0], owned=False)

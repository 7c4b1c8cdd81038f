"""Run the app under uvicorn with a graceful drain: the first SIGTERM (or SIGINT) stops accepting
(submits get 503, /readyz 503, polls and sample fetches go on), waits for the jobs in flight up to
the drain timeout, then exits 0. A second signal exits at once; jobs left are re-run at restart."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from .app import create_app
from .editor import Editor
from .keys import KeyRing
from .service import Service
from .settings import ServeSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: it would re-raise the signal after shutdown (exit status -15, not 0).
        if self.service.draining:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        log.info("%s: draining (up to %.0fs)", signal.Signals(sig).name, self.service.settings.drain_timeout)
        self.service.begin_drain()
        threading.Thread(target=self._drain_then_exit, name="kontext-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        self.service.drain(self.service.settings.drain_timeout)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.service.load_error is not None:
            return True
        return await super().on_tick(counter)


def run(settings: ServeSettings, editor_factory: Callable[[], Editor], keys: KeyRing | None) -> int:
    """Serve until drained. Exit status: 0, or 2 when the engine failed to load."""
    service = Service(settings, editor_factory)
    app = create_app(service, keys)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    DrainingServer(config, service).run()
    return 2 if service.load_error is not None else 0

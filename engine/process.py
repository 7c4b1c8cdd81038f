"""Ending a process without interpreter teardown: the standard streams flushed, then os._exit.

After an edit a process holds torch, diffusers and transformers (some 4,000 modules); clearing them one
by one at exit takes over a second on 2 cores, and runs C++ destructors (a c10d group's) in whatever
order teardown reaches them. The `kontext` command (cli.run) and each context-parallel worker
(distributed.rank) end through `exit_now` once their work and their own handlers are done."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn


def exit_now(status: int) -> NoReturn:
    """Flush stdout and stderr (a closed pipe, as in `kontext ... | head`, is ignored), then end the
    process with `status` and no module teardown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)

"""A free TCP port on 127.0.0.1 for a server a test starts later (a thread, a subprocess, Ray's proxy).

Binding port 0 and passing the number on leaves a window before the server binds it; meanwhile every
process that binds port 0 (Ray's GCS, raylet and workers, a torch TCPStore) is given a port from the
kernel's ephemeral range, and may be given that one (CI saw Ray's proxy fail to bind so). So the port
is drawn below that range, where nothing is handed out, and above Ray's worker ports (10002-19999)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOW = 20000  # above Ray's default worker ports
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768, Linux's default, where it is not readable)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port below the ephemeral range that 127.0.0.1 can bind now; port 0's pick if that range is
    too narrow here."""
    high = ephemeral_low()
    draw = random.Random()  # unseeded: test processes running at once must not draw alike
    for _ in range(100 if high - LOW >= 1000 else 0):
        port = draw.randrange(LOW, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

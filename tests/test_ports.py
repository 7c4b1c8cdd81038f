"""The test servers' port: outside the range the kernel hands to processes that bind port 0."""

from __future__ import annotations

import socket

from tests.ports import LOW, ephemeral_low, free_port


def test_a_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    high = ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(LOW <= p < high for p in ports), (sorted(ports), high)
    assert len(ports) > 1  # drawn, not one fixed port that two test processes would share
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))

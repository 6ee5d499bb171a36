"""The master's start-up checks: what they say about an address or a file an operator can fix."""

from __future__ import annotations

import socket

from flq.master.startup import listen_problem


def test_listen_problem_names_why_a_port_cannot_be_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert listen_problem("127.0.0.1", port).startswith("address in use")
    assert listen_problem("192.0.2.1", port) == "not an address of this machine"  # TEST-NET-1
    assert listen_problem("no-such-host.invalid", port).startswith("cannot resolve")

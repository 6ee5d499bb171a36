"""What the master checks before it builds anything expensive: problems an operator can fix,
reported as one line naming the address or file and exiting 2 (flq/cli/errors.py).

They run before the federation is built, so a wrong port or results directory is reported in a
second, not after TensorFlow's start-up.
"""

from __future__ import annotations

import errno
import socket

from flq.errors import UsageError


class StartupError(UsageError, RuntimeError):
    """The master cannot start as asked; the message names the address or file and why."""


def listen_problem(host: str, port: int) -> str:
    """Why gRPC could not bind host:port, found by binding a plain socket there (gRPC's own
    message says only "failed to bind")."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        return f"cannot resolve {host!r} ({error.strerror})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "address in use (another flq-master, or another program, listens there)"
            if error.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine"
            return error.strerror or str(error)
    return "gRPC could not bind it"

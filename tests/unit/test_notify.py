"""sd_notify against a real datagram socket, bound where systemd would bind it."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from flq import notify


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield sock


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.ready() is False
    assert notify.watchdog_interval() is None


def test_ready_stopping_and_status_arrive_as_single_datagrams(listener: socket.socket) -> None:
    assert notify.ready() is True
    assert _receive(listener) == "READY=1"
    assert notify.ready("listening on 0.0.0.0:50051")
    assert _receive(listener) == "READY=1\nSTATUS=listening on 0.0.0.0:50051"
    assert notify.status("round 3/30, accuracy 0.8120")
    assert _receive(listener) == "STATUS=round 3/30, accuracy 0.8120"
    assert notify.stopping()
    assert _receive(listener) == "STOPPING=1"


def test_abstract_socket_names_start_with_at(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"flq-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1")
        assert _receive(sock) == "READY=1"


def test_a_dead_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with capture_logs() as logs:
        assert notify.notify("READY=1") is False
    assert [e["event"] for e in logs] == ["sd_notify failed"]


def test_unsupported_socket_kinds_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.notify("READY=1") is False


def test_watchdog_interval_is_half_the_period_and_only_for_us(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert notify.watchdog_interval() is None  # WatchdogSec not set
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert notify.watchdog_interval() is None


async def test_watchdog_pings_until_stopped(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    task = notify.start_watchdog()
    assert task is not None
    pings = [await asyncio.wait_for(loop.sock_recv(listener, 64), 5) for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3
    await notify.stop_watchdog(task)
    assert task.cancelled()
    while True:  # drain what was sent before the cancel, then nothing more comes
        try:
            listener.recv(64)
        except BlockingIOError:
            break
    await asyncio.sleep(0.05)
    with pytest.raises(BlockingIOError):
        listener.recv(64)


def test_no_watchdog_task_without_watchdog_usec(listener: socket.socket) -> None:
    assert notify.start_watchdog() is None

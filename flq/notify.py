"""sd_notify without libsystemd: tell systemd (Type=notify units) how a daemon is doing.

systemd passes a datagram socket in $NOTIFY_SOCKET: a path, or an abstract name written with a
leading '@' (the kernel spells it with a NUL byte). Each message is one datagram of
newline-separated KEY=VALUE assignments: READY=1 once serving, STOPPING=1 when shutting down,
STATUS=free text shown by `systemctl status`, WATCHDOG=1 as a keep-alive when the unit sets
WatchdogSec= (systemd exports the period as $WATCHDOG_USEC; we ping at half of it). Outside systemd
$NOTIFY_SOCKET is unset and every call here is a cheap no-op that returns False, so the daemons
call these unconditionally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import structlog

log = structlog.get_logger("flq.notify")


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock:... and other transports of newer systemd: not used on our boards


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; True when a datagram was sent."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("sd_notify failed", socket=raw, error=str(error))
        return False
    return True


def ready(status: str = "") -> bool:
    return notify(f"READY=1\nSTATUS={status}" if status else "READY=1")


def stopping(status: str = "") -> bool:
    return notify(f"STOPPING=1\nSTATUS={status}" if status else "STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the unit's WatchdogSec), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if pid and pid != str(os.getpid()):  # meant for another process (we were forked or exec'd)
        return None
    return int(usec) / 2e6


async def ping_watchdog(interval: float) -> None:
    """WATCHDOG=1 every `interval` seconds while the event loop is alive; runs until cancelled.

    Pinging from the event loop is the point: a loop blocked by a stuck call stops the pings and
    systemd restarts the daemon.
    """
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog() -> asyncio.Task[None] | None:
    """Start the pinger when systemd asked for one (call from a running loop)."""
    interval = watchdog_interval()
    if interval is None:
        return None
    log.debug("watchdog pings", interval_s=interval)
    return asyncio.create_task(ping_watchdog(interval), name="sd-watchdog")


async def stop_watchdog(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

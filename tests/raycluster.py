"""A real Ray cluster on 127.0.0.1 for tests and benchmarks: `ray start --head`, then
`ray start --address` for each further node, each a `--block`ing process of ours, stopped with
SIGTERM (Ray drains and ends the node's processes) and killed by process group if it lingers.

Every port is chosen free, and the session files live in a fresh temporary directory, so the
cluster shares nothing with another one on this machine. The raylet gives its dashboard agent
~15 s to start; on a machine so loaded that an idle Python import takes longer (high niceness
under CPU-bound jobs), the node fails to start and the error says so, with the raylet's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STARTED = "Ray runtime started"
START_ATTEMPTS = 3
STOP_WAIT_S = 60.0  # a node drains (up to 30 s with work in flight) before it exits


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ray_command() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _node_ports() -> list[str]:
    """Fixed free ports for a node's agents, so none of them races another cluster's."""
    metrics, listen, grpc, runtime_env, node_manager, objects = free_ports(6)
    return [
        f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={listen}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={objects}",
    ]


@contextmanager
def local_ray_cluster(
    nodes: int = 2, cpus_per_node: int = 1, start_timeout_s: float = 180.0, worker_niceness: int = 0
) -> Iterator[str]:
    """A cluster of `nodes` nodes on this machine; yields the head's address (host:port).
    Its workers (the actors) run `worker_niceness` steps nicer than the process that started
    it. Torn down on exit, also when starting it or the body failed."""
    temp_dir = tempfile.mkdtemp(prefix="flq-ray-")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray runs its workers 15 steps nicer than the node by default; on a loaded machine
        # that starved the actors for minutes.
        "RAY_worker_niceness": str(worker_niceness),
        # The metrics exporter needs ray[default]; without it every node logs its absence.
        "RAY_enable_metrics_collection": "0",
    }
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--disable-usage-stats"]
    started: list[subprocess.Popen[bytes]] = []
    try:
        head, address = _start_with_retries(
            lambda: _head_args(temp_dir), common, Path(temp_dir) / "node0", env, start_timeout_s
        )
        started.append(head)
        for index in range(1, nodes):
            node, _ = _start_with_retries(
                lambda: ([f"--address={address}"], address),
                common,
                Path(temp_dir) / f"node{index}",
                env,
                start_timeout_s,
            )
            started.append(node)
        yield address
    finally:
        for process in reversed(started):
            _stop_node(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _head_args(temp_dir: str) -> tuple[list[str], str]:
    head_port, client_port, dashboard_port = free_ports(3)
    args = [
        "--head",
        f"--port={head_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
    ]
    return args, f"127.0.0.1:{head_port}"


def _start_with_retries(
    role: Callable[[], tuple[list[str], str]],
    common: list[str],
    log_stem: Path,
    env: dict[str, str],
    timeout_s: float,
) -> tuple[subprocess.Popen[bytes], str]:
    """A started node and the head's address. A start that fails (on a loaded machine the
    raylet may give up on its agent) is cleaned up and tried again, with fresh ports."""
    for attempt in range(1, START_ATTEMPTS + 1):
        args, address = role()
        log_path = log_stem.with_name(f"{log_stem.name}-{attempt}.log")
        process = _start_node([*args, *common, *_node_ports()], log_path, env)
        try:
            _wait_started(process, log_path, str(log_stem.parent), timeout_s)
            return process, address
        except RuntimeError:
            _stop_node(process)
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _start_node(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [_ray_command(), "start", *args, "--block"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: killed as one if it lingers
        )


def _wait_started(
    process: subprocess.Popen[bytes], log_path: Path, temp_dir: str, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if STARTED in text:
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(
        f"ray node did not start within {timeout_s:g} s (exit {process.poll()}):\n"
        f"{log_path.read_text(errors='replace')[-2000:]}\n{_raylet_errors(temp_dir)}"
    )


def _raylet_errors(temp_dir: str) -> str:
    lines = []
    for path in Path(temp_dir).glob("session_latest/logs/raylet*.out"):
        lines += [line for line in path.read_text(errors="replace").splitlines() if " C " in line]
    return "\n".join(lines[-5:])


def _stop_node(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group we created for this node
    except ProcessLookupError:
        pass
    process.wait()

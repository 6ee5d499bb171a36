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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTED = "Ray runtime started"
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
    nodes: int = 2, cpus_per_node: int = 1, start_timeout_s: float = 180.0
) -> Iterator[str]:
    """A cluster of `nodes` nodes on this machine; yields the head's address (host:port).
    Torn down on exit, also when starting it or the body failed."""
    temp_dir = tempfile.mkdtemp(prefix="flq-ray-")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray runs its workers 15 steps nicer than the node; under a loaded machine that starved
        # the actors for minutes. They run at the niceness of whoever started the cluster.
        "RAY_worker_niceness": "0",
        # The metrics exporter needs ray[default]; without it every node logs its absence.
        "RAY_enable_metrics_collection": "0",
    }
    head_port, client_port, dashboard_port = free_ports(3)
    address = f"127.0.0.1:{head_port}"
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--disable-usage-stats"]
    head = [
        "--head",
        f"--port={head_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
    ]
    started: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(nodes):
            role = head if index == 0 else [f"--address={address}"]
            log_path = Path(temp_dir) / f"node{index}.log"
            started.append(_start_node([*role, *common, *_node_ports()], log_path, env))
            _wait_started(started[-1], log_path, temp_dir, start_timeout_s)
        yield address
    finally:
        for process in reversed(started):
            _stop_node(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


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

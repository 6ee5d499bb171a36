"""The daemons' lifecycle as an operator meets it: real `flq-master` / `flq-worker` processes on
127.0.0.1, started from the command line and stopped with signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flq.demo import free_port
from flq.log import QUIET_ENV

pytestmark = pytest.mark.slow


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **QUIET_ENV, "PYTHONUNBUFFERED": "1"},
        )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def synthetic_config(path: Path, *, train_s: float = 0.2, **system: object) -> Path:
    settings = {
        "total_workers": 2,
        "min_workers": 1,
        "max_rounds": 100_000,
        "round_timeout_s": 60.0,
        "master_url": '"http://127.0.0.1:0"',
        **system,
    }
    lines = "\n".join(f"{key} = {value}" for key, value in settings.items())
    path.write_text(f"""
[system]
{lines}
[dataset]
name = "synthetic"
batch_size = 16
synthetic_train_s = {train_s}
[flq_algorithm]
mode = "bbit"
""")
    return path


def master_args(config: Path, port: int, run_dir: Path, *extra: str) -> list[str]:
    return [
        "flq.cli.master",
        "run",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--run-dir",
        str(run_dir),
        "--log-format",
        "json",
        *extra,
    ]


def worker_args(config: Path, port: int, worker_id: str) -> list[str]:
    return [
        "flq.cli.worker",
        "run",
        "--master",
        f"127.0.0.1:{port}",
        "--worker-id",
        worker_id,
        "--config",
        str(config),
        "--log-format",
        "json",
    ]


def test_a_worker_stopped_mid_training_exits_promptly(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Local training takes 30 s a round here; SIGTERM must not wait for it to end."""
    config = synthetic_config(tmp_path / "cfg.toml", train_s=30.0)
    port = free_port()
    processes.append(spawn(master_args(config, port, tmp_path / "run"), tmp_path / "master.log"))
    worker_log = tmp_path / "worker.log"
    worker = spawn(worker_args(config, port, "w0"), worker_log)
    processes.append(worker)
    wait_until(lambda: '"connected"' in worker_log.read_text(), 60, "the worker to connect")
    time.sleep(1.0)  # well inside the 30 s training step of round 1
    worker.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert worker.wait(20) == 0
    assert time.monotonic() - stopped < 5.0
    assert '"worker stopped"' in worker_log.read_text()


def test_a_second_master_on_a_taken_port_exits_2_naming_the_port(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    config = synthetic_config(tmp_path / "cfg.toml")
    port = free_port()
    first_log = tmp_path / "first.log"
    first = spawn(master_args(config, port, tmp_path / "first"), first_log)
    processes.append(first)
    wait_until(lambda: "master listening" in first_log.read_text(), 60, "the first master")
    second = subprocess.run(
        [sys.executable, "-m", *master_args(config, port, tmp_path / "second")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **QUIET_ENV, "COLUMNS": "200"},
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address in use" in second.stderr
    assert "master listening" not in second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the first one serves on


def test_connect_timeout_gives_up_naming_the_workers_it_saw(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Two workers are needed, one comes: after connect_timeout_s the master exits 6 and says
    who was there."""
    config = synthetic_config(tmp_path / "cfg.toml", min_workers=2, connect_timeout_s=10.0)
    port = free_port()
    master_log = tmp_path / "master.log"
    master = spawn(master_args(config, port, tmp_path / "run"), master_log)
    processes.append(master)
    processes.append(spawn(worker_args(config, port, "w0"), tmp_path / "worker.log"))
    assert master.wait(60) == 6
    text = master_log.read_text()
    assert "gave up after 10 s (system.connect_timeout_s) waiting for 2 workers" in text
    assert "1 connected (w0)" in text
    assert "Traceback" not in text

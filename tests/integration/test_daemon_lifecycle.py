"""The daemons' lifecycle as an operator meets it: real `flq-master` / `flq-worker` processes on
127.0.0.1, started from the command line and stopped with signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flq.demo import free_port
from flq.log import QUIET_ENV
from tests.processes import master_args, spawn, synthetic_config, wait_until, worker_args

pytestmark = pytest.mark.slow


def test_a_worker_stopped_mid_training_exits_promptly(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Local training takes 30 s a round here; SIGTERM must not wait for it to end."""
    config = synthetic_config(
        tmp_path / "cfg.toml", 100_000, train_s=30.0, round_timeout_s=60.0, min_workers=1
    )
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
    config = synthetic_config(tmp_path / "cfg.toml", 100_000)
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
    config = synthetic_config(tmp_path / "cfg.toml", 100_000, system="connect_timeout_s = 10.0")
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

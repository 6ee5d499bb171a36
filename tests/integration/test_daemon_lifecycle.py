"""The daemons' lifecycle as an operator meets it: real `flq-master` / `flq-worker` processes on
127.0.0.1, started from the command line and stopped with signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flq.demo import free_port
from flq.log import QUIET_ENV
from tests.processes import (
    complete_rounds,
    last_round,
    master_args,
    spawn,
    synthetic_config,
    wait_until,
    worker_args,
)

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


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
# The master started so that importing TensorFlow fails: what these checks report, they report
# before the model (and TensorFlow with it) is built.
WITHOUT_TENSORFLOW = (
    "import sys; sys.modules['tensorflow'] = None; from flq.cli.master import app; app()"
)


def _a_checkpoint(run_dir: Path, **overrides: object) -> Path:
    """A real checkpoint, as the master writes it, of a synthetic run with `overrides`."""
    from flq.config import default_config, with_overrides
    from flq.master.bookkeeper import RoundBookkeeper
    from flq.master.federation import build_federation

    cfg = with_overrides(default_config(), {"dataset.name": "synthetic", **overrides})
    books = RoundBookkeeper(build_federation(cfg), run_dir)
    books.save()
    books.close()
    return run_dir / "checkpoint.npz"


def _truncated(run_dir: Path) -> None:
    path = _a_checkpoint(run_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("prepare", "resume", "message"),
    [
        (lambda d: None, True, "checkpoint.npz: no checkpoint there (start without --resume)"),
        (_truncated, True, "checkpoint.npz: unreadable checkpoint, truncated or corrupt"),
        (
            lambda d: _a_checkpoint(d, **{"flq_algorithm.mode": "laq8"}),
            True,
            "checkpoint.npz: written by a run with mode laq8, dataset synthetic; "
            "this config has mode bbit, dataset digits",
        ),
        (lambda d: d.rmdir() or d.write_text("a file"), False, "cannot write results there"),
    ],
    ids=["no-checkpoint", "truncated", "another-run", "unwritable-results"],
)
def test_start_up_errors_are_one_line_exit_2_and_come_before_tensorflow(
    tmp_path: Path, prepare: Callable[[Path], object], resume: bool, message: str
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare(run_dir)
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, "run", "--port", "0"]
        + ["--config", str(EXAMPLES / "digits-bbit.toml"), "--run-dir", str(run_dir)]
        + (["--resume"] if resume else []),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **QUIET_ENV, "COLUMNS": "300"},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_killed_master_resumes_with_every_round_in_rounds_csv_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Checkpoints every 3 rounds; the master is SIGKILLed with rounds.csv ahead of its last
    checkpoint and with temporaries of an interrupted checkpoint write beside it. On --resume the
    temporaries are gone, the rows the checkpoint does not cover are dropped and redone, and
    rounds.csv holds each round exactly once."""
    config = synthetic_config(tmp_path / "cfg.toml", 100_000, system="checkpoint_every = 3")
    run_dir, port = tmp_path / "run", free_port()
    args = master_args(config, port, run_dir)
    master_log = tmp_path / "master.log"
    master = spawn(args, master_log)
    processes.append(master)
    for i in range(2):
        processes.append(spawn(worker_args(config, port, f"w{i}"), tmp_path / f"w{i}.log"))
    wait_until(lambda: len(complete_rounds(run_dir)) in (4, 5), 90, "rounds past a checkpoint")
    master.kill()
    master.wait()
    orphans = [run_dir / f".checkpoint.npz.killed{i}.tmp" for i in range(3)]
    for orphan in orphans:
        orphan.write_bytes(b"half a checkpoint")
    killed_at = last_round(run_dir)

    resumed = spawn([*args, "--resume"], master_log)
    processes.append(resumed)
    wait_until(
        lambda: last_round(run_dir) >= killed_at + 3,
        90,
        "rounds after the resume",
    )
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(30) == 0
    rounds = [int(r["round"]) for r in complete_rounds(run_dir)]
    assert rounds == list(range(1, len(rounds) + 1)), rounds
    assert not any(orphan.exists() for orphan in orphans)
    log = master_log.read_text()
    assert "rounds.csv reconciled with the checkpoint" in log
    assert "removed temporaries of interrupted checkpoint writes" in log

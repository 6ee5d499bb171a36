"""Real daemons as a user starts them: flq-master and flq-worker processes on 127.0.0.1.

Shared by the process tests and the fault soak (tests/soak, bench/bench_soak.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from flq.demo import spawn_module
from flq.master.results import read_rounds


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m ARGS` as `flq demo` starts a daemon, output appended to `log`."""
    return spawn_module(args, log, append=True)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def complete_rounds(run_dir: Path) -> list[dict[str, str]]:
    """rounds.csv's rows, without a line caught mid-write."""
    path = run_dir / "rounds.csv"
    rows = read_rounds(path) if path.exists() else []
    return [r for r in rows if None not in r.values()]


def last_round(run_dir: Path) -> int:
    """The highest round in rounds.csv (0 before the first)."""
    return max((int(r["round"]) for r in complete_rounds(run_dir)), default=0)


def master_args(config: Path, port: int, run_dir: Path) -> list[str]:
    """`flq-master run` on 127.0.0.1:port with JSON logs (arguments for spawn)."""
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
    ]


def worker_args(config: Path, port: int, worker_id: str, *extra: str) -> list[str]:
    """`flq-worker run` against 127.0.0.1:port with JSON logs (arguments for spawn)."""
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
        *extra,
    ]


def synthetic_config(
    path: Path,
    rounds: int,
    *,
    workers: int = 3,
    round_timeout_s: float = 3.0,
    train_s: float = 0.2,
    lazy_c: int = 50,
    min_workers: int = 2,
    system: str = "",
    extra: str = "",
) -> Path:
    """A bbit run of the numpy synthetic problem (no TensorFlow in any process); `system` adds
    lines to [system], `extra` further sections."""
    path.write_text(f"""
[system]
total_workers = {workers}
min_workers = {min_workers}
max_rounds = {rounds}
round_timeout_s = {round_timeout_s}
master_url = "http://127.0.0.1:0"
{system}
[dataset]
name = "synthetic"
batch_size = 16
synthetic_train_s = {train_s}
[model]
lr = 0.05
[flq_algorithm]
mode = "bbit"
b_up = 4
b_down = 8
[lazy_selection]
thr_scale = 0.5
warmup = 2
C = {lazy_c}
{extra}""")
    return path

"""Real processes, as a user runs them: flq-master and flq-worker started from the command line,
killed with signals, restarted with --resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flq.demo import child_env, free_port
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


def test_demo_runs_a_real_federation_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flq.cli.main",
            "demo",
            "--workers",
            "3",
            "--rounds",
            "8",
            "--out",
            str(out),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = complete_rounds(out)
    assert [int(r["round"]) for r in rows] == list(range(1, 9))
    accuracy = [float(r["accuracy"]) for r in rows]
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0]  # 10 classes: chance is 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["demo"]["uplink_bits"] == sum(int(r["uplink_bits"]) for r in rows)
    assert summary["demo"]["uplink_ratio"] < 0.2  # 4-bit vs float32, plus skips
    for name in ("plot.png", "master.log", "worker-0.log", "config.toml", "checkpoint.npz"):
        assert (out / name).exists(), name
    assert "final accuracy" in result.stdout


def test_killed_worker_fails_its_round_and_a_restarted_master_resumes(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    config = synthetic_config(tmp_path / "cfg.toml", rounds=100_000)
    run_dir = tmp_path / "run"
    port = free_port()
    args = master_args(config, port, run_dir)
    master = spawn(args, tmp_path / "master.log")
    processes.append(master)
    workers = [
        spawn(
            worker_args(config, port, f"w{i}", "--heartbeat", "0.5"),
            tmp_path / f"worker-{i}.log",
        )
        for i in range(3)
    ]
    processes.extend(workers)
    wait_until(
        lambda: any(r["fresh"].count("w") == 3 for r in complete_rounds(run_dir)),
        90,
        "a round where all three workers upload",
    )

    workers[2].send_signal(signal.SIGKILL)
    workers[2].wait()
    wait_until(
        lambda: any("w2:" in r["failures"] for r in complete_rounds(run_dir)),
        30,
        "a round that records w2's failure",
    )
    after_kill = len(complete_rounds(run_dir))
    wait_until(lambda: len(complete_rounds(run_dir)) >= after_kill + 3, 30, "rounds after the kill")

    master.send_signal(signal.SIGKILL)
    master.wait()
    checkpointed = last_round(run_dir)
    resumed = spawn([*args, "--resume"], tmp_path / "master.log")
    processes.append(resumed)
    wait_until(
        lambda: last_round(run_dir) >= checkpointed + 5,
        90,
        "rounds after the restart",
    )

    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(30) == 0
    rows = complete_rounds(run_dir)
    later = [r for r in rows if int(r["round"]) > checkpointed]
    assert int(later[0]["round"]) == checkpointed + 1, "resume continues after the checkpoint"
    # The two surviving workers came back by themselves and keep uploading.
    assert all(int(r["selected"]) + int(r["skipped"]) + int(r["denied"]) >= 2 for r in later[1:])
    assert float(later[-1]["loss"]) < float(rows[0]["loss"])
    worker_log = (tmp_path / "worker-0.log").read_text()
    assert worker_log.count('"connected"') >= 2 and "reconnecting" in worker_log
    assert "stop requested" in (tmp_path / "master.log").read_text()
    for worker in workers[:2]:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_second_signal_abandons_the_round_and_leaves_a_valid_checkpoint(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    from flq.master.checkpoint import load_checkpoint

    config = synthetic_config(tmp_path / "cfg.toml", rounds=100_000)
    text = config.read_text().replace("synthetic_train_s = 0.2", "synthetic_train_s = 4.0")
    config.write_text(text.replace("round_timeout_s = 3.0", "round_timeout_s = 60.0"))
    run_dir = tmp_path / "run"
    port = free_port()
    master = spawn(master_args(config, port, run_dir), tmp_path / "master.log")
    processes.append(master)
    for i in range(2):
        processes.append(spawn(worker_args(config, port, f"w{i}"), tmp_path / f"worker-{i}.log"))
    wait_until(lambda: len(complete_rounds(run_dir)) >= 1, 60, "the first round")
    master.send_signal(signal.SIGTERM)  # waits for the round in flight (4 s of training)
    time.sleep(0.5)
    assert master.poll() is None, "the first signal lets the round finish"
    master.send_signal(signal.SIGTERM)  # ...the second one does not
    assert master.wait(10) == 130
    log = (tmp_path / "master.log").read_text()
    assert "forced exit" in log and "Traceback" not in log
    saved = load_checkpoint(run_dir / "checkpoint.npz")
    assert int(saved["master"]["round"]) >= 2

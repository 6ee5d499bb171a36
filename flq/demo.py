"""`flq demo`: a real federation on 127.0.0.1 — one master and N worker processes over gRPC.

It writes the config it used, each process's log, the master's rounds.csv and checkpoint, a
summary.json and plot.png into the run directory, and shows progress while it runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flq.config import (
    Config,
    ConfigError,
    config_to_dict,
    dumps_toml,
    keys_set_in,
    load_config,
    with_overrides,
)
from flq.log import QUIET_ENV
from flq.master.results import read_rounds


@dataclass(frozen=True)
class DemoOptions:
    workers: int = 4
    rounds: int = 30
    mode: str = "bbit"
    dataset: str = "digits"
    model: str = "mlp"
    b_up: int = 4
    b_down: int = 8
    lazy: bool = True
    thr_scale: float = 0.5
    budget_bits: float = 0.0
    weighting: str = "samples"
    lora_rank: int = 0  # > 0: LoRA-only federation (adapters on every Dense layer)
    # none | distill | param_attention (None: the base config's); without a teacher file of
    # the user's, one is trained on the master's held-out share first (with_demo_fusion)
    fusion: str | None = None
    out: Path | None = None
    base_config: Path | None = None
    timeout_s: float = 900.0
    extra: dict[str, Any] = field(default_factory=dict)  # more "section.key" overrides


@dataclass(frozen=True)
class DemoSummary:
    run_dir: str
    rounds: int
    final_accuracy: float
    best_accuracy: float
    uplink_bits: int
    float32_fedavg_bits: int
    uplink_ratio: float
    skipped_uploads: int
    failed: int
    seconds: float
    total_parameters: int = 0
    exchanged_parameters: int = 0  # < total with LoRA: only the adapters travel
    uplink_bytes_per_upload: float = 0.0
    full_model_uplink_bytes_per_upload: float = 0.0  # the whole model with the same codec
    weights_sources: dict[str, int] = field(default_factory=dict)  # rounds per weights source
    fusion: dict[str, int] = field(default_factory=dict)  # rounds per fusion result (applied, ...)


# The demo's own training settings (a ~1 minute digits run): a --config file overrides only the
# keys it sets itself, so a file with only [llm] still trains like the demo.
DEMO_SETTINGS: dict[str, Any] = {
    "model.local_steps": 0,
    "model.local_epochs": 1,
    "model.lr": 0.1,
    "dataset.batch_size": 32,
    "lazy_selection.warmup": 3,
    "lazy_selection.C": 10,
    "system.round_timeout_s": 60.0,
    "system.connect_timeout_s": 120.0,
}


def demo_config(options: DemoOptions) -> Config:
    """The demo's settings, the keys the --config file sets, then the user's options."""
    base = load_config(options.base_config)
    from_file = set() if options.base_config is None else keys_set_in(options.base_config)
    overrides = {key: value for key, value in DEMO_SETTINGS.items() if key not in from_file}
    overrides.update(
        {
            "system.total_workers": options.workers,
            "system.min_workers": options.workers,
            "system.max_rounds": options.rounds,
            "dataset.name": options.dataset,
            "model.name": options.model,
            "flq_algorithm.mode": options.mode,
            "flq_algorithm.b_up": options.b_up,
            "flq_algorithm.b_down": options.b_down,
            "flq_algorithm.weighting": options.weighting,
            "lora.rank": options.lora_rank,
            "lazy_selection.thr_scale": options.thr_scale if options.lazy else 0.0,
            "budget_selection.up_budget_bits": options.budget_bits,
            **options.extra,
        }
    )
    return with_overrides(base, overrides)


DEMO_SERVER_SHARE = 0.1  # the master's held-out share of the data, when the base config has none
TEACHER_EPOCHS = 30  # digits: ~135 server samples, a second or two an epoch
TEACHER_WIDTH = 16  # conv filters of its first block: plenty for 8x8 digits, quick to train


def with_demo_fusion(cfg: Config, method: str | None, run_dir: Path) -> Config:
    """`cfg` with fusion `method` (None: as configured). Without a teacher file of the user's,
    one is trained on the master's held-out share (flq.learning.teacher) into the run directory
    and fusion.teacher points at it."""
    method = method or cfg.fusion.method
    if method == "none":
        return with_overrides(cfg, {"fusion.method": "none"})
    share = cfg.fusion.server_share or DEMO_SERVER_SHARE
    teacher = cfg.fusion.teacher
    if not teacher:
        from flq.learning.teacher import train_teacher

        teacher = str(run_dir / "teacher.keras")
        train_teacher(
            Path(teacher),
            dataset=cfg.dataset.name,
            data_dir=cfg.dataset.data_dir,
            server_share=share,
            seed=cfg.system.seed,
            test_fraction=cfg.dataset.test_fraction,
            epochs=TEACHER_EPOCHS,
            width=TEACHER_WIDTH,
        )
    overrides = {"fusion.method": method, "fusion.teacher": teacher, "fusion.server_share": share}
    return with_overrides(cfg, overrides)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(**extra: str) -> dict[str, str]:
    """The environment a daemon process gets: ours, quiet TF/gRPC logs unless already set,
    unbuffered output (its log is read while it runs), then `extra`."""
    env = dict(os.environ)
    for key, value in QUIET_ENV.items():
        env.setdefault(key, value)
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def spawn_module(
    args: list[str], log_path: Path, *, append: bool = False, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """`python -m ARGS` with child_env(), stdout and stderr to `log_path`."""
    with log_path.open("ab" if append else "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=new_session,
        )


class DemoCluster:
    """The processes of one local federation, and their orderly end."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.port = free_port()
        self.config_path = run_dir / "config.toml"
        self.master: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dumps_toml(self.cfg))
        self.master = spawn_module(
            [
                "flq.cli.master",
                "run",
                "--config",
                str(self.config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--run-dir",
                str(self.run_dir),
                "--log-format",
                "json",
            ],
            self.run_dir / "master.log",
            new_session=True,
        )
        for index in range(self.cfg.system.total_workers):
            self.workers.append(
                spawn_module(
                    [
                        "flq.cli.worker",
                        "run",
                        "--master",
                        f"127.0.0.1:{self.port}",
                        "--worker-id",
                        f"w{index}",
                        "--config",
                        str(self.config_path),
                        "--log-format",
                        "json",
                    ],
                    self.run_dir / f"worker-{index}.log",
                    new_session=True,
                )
            )

    def master_running(self) -> bool:
        return self.master is not None and self.master.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        processes = [p for p in [self.master, *self.workers] if p is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_demo(
    options: DemoOptions, on_round: Callable[[dict[str, str]], None] | None = None
) -> DemoSummary:
    cfg = demo_config(options)
    run_dir = options.out or Path("results") / time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = with_demo_fusion(cfg, options.fusion, run_dir)
    cluster = DemoCluster(cfg, run_dir)
    started = time.monotonic()
    cluster.start()
    seen = 0
    try:
        while cluster.master_running():
            if time.monotonic() - started > options.timeout_s:
                raise TimeoutError(
                    f"demo did not finish within {options.timeout_s:.0f} s; "
                    f"see the logs in {run_dir}"
                )
            seen = _report_new_rows(run_dir, seen, on_round)
            time.sleep(0.3)
        _report_new_rows(run_dir, seen, on_round)
    finally:
        cluster.stop()
    master = cluster.master
    if master is not None and master.returncode != 0:
        raise RuntimeError(f"master exited with {master.returncode}; see {run_dir / 'master.log'}")
    return summarize(run_dir, cfg, time.monotonic() - started)


def _report_new_rows(
    run_dir: Path, seen: int, on_round: Callable[[dict[str, str]], None] | None
) -> int:
    path = run_dir / "rounds.csv"
    if not path.exists():
        return seen
    rows = read_rounds(path)
    for row in rows[seen:]:
        if on_round is not None:
            on_round(row)
    return len(rows)


def summarize(run_dir: Path, cfg: Config, seconds: float) -> DemoSummary:
    rows = read_rounds(run_dir / "rounds.csv")
    if not rows:
        raise RuntimeError(f"no rounds were completed; see the logs in {run_dir}")
    accuracies = [float(r["accuracy"]) for r in rows if r["accuracy"] not in ("", "nan")]
    master_summary = json.loads((run_dir / "summary.json").read_text())
    parameters = int(master_summary.get("parameters", 0))
    participants = sum(int(r["participants"] or 0) for r in rows)
    uplink = sum(int(r["uplink_bits"]) for r in rows)
    float32_bits = participants * parameters * 32
    summary = DemoSummary(
        run_dir=str(run_dir),
        rounds=len(rows),
        final_accuracy=accuracies[-1] if accuracies else math.nan,
        best_accuracy=max(accuracies) if accuracies else math.nan,
        uplink_bits=uplink,
        float32_fedavg_bits=float32_bits,
        uplink_ratio=uplink / float32_bits if float32_bits else math.nan,
        skipped_uploads=sum(int(r["skipped"]) for r in rows),
        failed=sum(int(r["failed"]) for r in rows),
        seconds=seconds,
        total_parameters=int(master_summary.get("total_parameters", parameters)),
        exchanged_parameters=int(master_summary.get("exchanged_parameters", parameters)),
        uplink_bytes_per_upload=float(master_summary.get("uplink_bytes_per_upload", 0.0)),
        full_model_uplink_bytes_per_upload=float(
            master_summary.get("full_model_uplink_bytes_per_upload", 0.0)
        ),
        weights_sources=dict(Counter(r.get("weights_source", "") for r in rows)),
        fusion=dict(Counter(r["fusion"] for r in rows if r.get("fusion"))),
    )
    merged = {**master_summary, "demo": asdict(summary), "config": config_to_dict(cfg)}
    (run_dir / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
    try:
        from flq.report import load_curve, plot_curves

        plot_curves(
            [load_curve(run_dir, cfg.flq_algorithm.mode)],
            run_dir / "plot.png",
            title=f"flq demo: {cfg.dataset.label}, {cfg.flq_algorithm.mode}",
        )
    except ImportError:
        pass  # matplotlib is optional ([plot] extra)
    return summary


__all__ = ["ConfigError", "DemoOptions", "DemoSummary", "demo_config", "run_demo"]

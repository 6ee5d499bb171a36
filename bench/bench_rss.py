"""Benchmark 3c: peak memory of a real `flq-worker` process training the CNN on Fashion-MNIST.

    python -m bench.bench_rss                     # bench/configs/fmnist-bin.toml, 5 rounds
    python -m bench.bench_rss --json docs/results/daemons/rss.json

Starts `flq-master run` and one `flq-worker run` as separate processes on 127.0.0.1 (the config's
20-worker Dirichlet split; the worker loads the largest partition, the worst case) and samples
/proc/<pid>/status of the worker every 0.2 s: VmHWM is the kernel's own record of the peak
resident set, so a short spike between samples is not missed. Target (engine issue): <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_rounds import machine, proc_status_kib
from flq.config import dumps_toml, load_config, with_overrides

TARGET_MIB = 1e9 / 2**20  # 1 GB = 953.7 MiB
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def largest_partition(cfg: Any) -> tuple[int, int]:
    """(index, samples) of the biggest partition the config's split gives."""
    from flq.learning.data import load_dataset
    from flq.learning.partition import partition_indices

    data = cfg.dataset
    _, train, _ = load_dataset(
        data.name, data.data_dir, test_fraction=data.test_fraction, seed=cfg.system.seed
    )
    parts = partition_indices(
        train.y,
        cfg.system.total_workers,
        data.partition,
        dir_alpha=data.dir_alpha,
        shards_per_worker=data.shards_per_worker,
        seed=cfg.system.seed,
    )
    sizes = [len(p) for p in parts]
    index = max(range(len(sizes)), key=sizes.__getitem__)
    return index, sizes[index]


def measure(config: Path, rounds: int) -> dict[str, Any]:
    port = free_port()
    cfg = with_overrides(
        load_config(config),
        {
            "system.min_workers": 1,
            "system.max_rounds": rounds,
            "system.eval_every": rounds,
            "system.target_accuracy": 0.0,
            "system.master_url": f"http://127.0.0.1:{port}",
            "logging.log_format": "json",
        },
    )
    index, samples = largest_partition(cfg)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    env["GRPC_VERBOSITY"] = "ERROR"
    with tempfile.TemporaryDirectory(prefix="flq-rss-") as tmp:
        cfg_path = Path(tmp) / "config.toml"
        cfg_path.write_text(dumps_toml(cfg))
        master_cmd = ["run", "--config", str(cfg_path), "--run-dir", str(Path(tmp) / "run")]
        worker_cmd = ["run", "--master", f"127.0.0.1:{port}", "--worker-id", f"w{index}"]
        master = subprocess.Popen(
            [str(VENV_BIN / "flq-master"), *master_cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "master.log", "w"),  # noqa: SIM115
        )
        worker = subprocess.Popen(
            [str(VENV_BIN / "flq-worker"), *worker_cmd, "--config", str(cfg_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "worker.log", "w"),  # noqa: SIM115
        )
        peak, samples_taken, last = 0, 0, {}
        began = time.perf_counter()
        while worker.poll() is None and time.perf_counter() - began < 900:
            try:
                status = proc_status_kib(worker.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            if "VmHWM" not in status:  # exiting: the memory is gone already
                break
            last = status
            peak = max(peak, status["VmHWM"])
            samples_taken += 1
            time.sleep(0.2)
        worker_rc = worker.wait(timeout=60)
        master_rc = master.wait(timeout=120)
        rows = (Path(tmp) / "run" / "rounds.csv").read_text().splitlines()
        worker_log = (Path(tmp) / "worker.log").read_text()[-2000:]
    return {
        "worker": "flq-worker",
        "config": str(config),
        "worker_id": f"w{index}",
        "partition_samples": samples,
        "rounds_completed": len(rows) - 1,
        "worker_peak_rss_mib": round(peak / 1024, 1),
        "worker_rss_last_mib": round(last.get("VmRSS", 0) / 1024, 1),
        "target_mib": TARGET_MIB,
        "meets": 0 < peak / 1024 <= TARGET_MIB,
        "samples": samples_taken,
        "seconds": round(time.perf_counter() - began, 1),
        "worker_rc": worker_rc,
        "master_rc": master_rc,
        "worker_log_tail": "" if worker_rc == 0 else worker_log,
        "bench_process_peak_mib": round(proc_status_kib()["VmHWM"] / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("bench/configs/fmnist-bin.toml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runs = [measure(args.config, args.rounds)]
    result = {"machine": machine(), "runs": runs}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ok = all(r["worker_rc"] == 0 and r["rounds_completed"] >= args.rounds for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

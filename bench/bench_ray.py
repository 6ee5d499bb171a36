"""Benchmark: `flq simulate` in one process vs on a local Ray cluster, rounds per second.

    python -m bench.bench_ray --rounds 6 --json docs/results/ray.json   # make bench-ray

The 20-worker Fashion-MNIST CNN setting (bench/configs/fmnist-bbit-b3block256-top5.toml), a few
rounds each way, one after the other in one run (the machine is shared: compare within a run).
The Ray side is a real cluster of two nodes on 127.0.0.1 started with `ray start`
(tests/raycluster.py), each node offering half the workers' CPU reservations; both nodes share
this machine's cores, so Ray can only add cost here: this measures that cost (start-up, actor
calls, object transfers, one TensorFlow runtime per worker) — the scaling plan over N machines
is in docs/benchmarks.md.

Steady rate = (rounds - 1) / (time of the last round's row - time of the first round's row):
round 1 traces TensorFlow's functions and is reported apart, with the start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flq.config import Config, load_config, with_overrides
from flq.sim import simulate
from tests.raycluster import local_ray_cluster

CONFIG = Path(__file__).parent / "configs" / "fmnist-bbit-b3block256-top5.toml"


def run(cfg: Config, out: Path, ray_address: str | None) -> dict[str, Any]:
    """Wall times of one simulation: start-up (to the first round's row), steady rounds/s."""
    stamps: list[float] = []
    engine_seconds: list[float] = []

    def on_round(row: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        engine_seconds.append(float(row["seconds"]))

    began = time.perf_counter()
    result = simulate(cfg, out, on_round=on_round, ray_address=ray_address)
    ended = time.perf_counter()
    steady_s = stamps[-1] - stamps[0]
    return {
        "rounds": result.rounds,
        "to_first_round_s": round(stamps[0] - began, 2),
        "steady_rounds_per_s": round((len(stamps) - 1) / steady_s, 4) if steady_s > 0 else None,
        "steady_s_per_round": round(steady_s / (len(stamps) - 1), 3),
        "total_s": round(ended - began, 2),
        # The engine's own time per round (rounds.csv `seconds`, without the evaluation).
        "median_engine_s_per_round_after_1": round(statistics.median(engine_seconds[1:]), 3),
        "uplink_bits": result.uplink_bits,
        "wire_bytes": result.wire_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="[ray] num_cpus per worker")
    parser.add_argument("--nice", type=int, default=10, help="run the measured parts this nicer")
    parser.add_argument("--ray-only", action="store_true", help="skip the in-process run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # SIGTERM as an exception, so the cluster's `finally` stops its nodes on a kill too.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    cfg = with_overrides(
        load_config(CONFIG),
        {
            "system.total_workers": args.workers,
            "system.min_workers": args.workers,
            "system.max_rounds": args.rounds,
            "system.target_accuracy": 0.0,
            "ray.num_cpus": args.num_cpus,
            "ray.start_timeout_s": 1800.0,
        },
    )
    figures: dict[str, Any] = {
        "command": "python -m bench.bench_ray " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average_before": [round(x, 1) for x in os.getloadavg()],
        "setting": f"{CONFIG.name}, {args.workers} workers, {args.rounds} rounds",
    }
    cpus_per_node = math.ceil(args.workers * args.num_cpus / args.nodes)
    figures["ray_nodes"], figures["ray_cpus_per_node"] = args.nodes, cpus_per_node
    began = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="flq-bench-ray-") as tmp,
        local_ray_cluster(args.nodes, cpus_per_node, 600, worker_niceness=args.nice) as address,
    ):
        figures["ray_cluster_start_s"] = round(time.perf_counter() - began, 2)
        # The cluster's daemons start at our niceness (Ray's raylet gives its agent ~15 s to
        # start); what is measured runs `--nice` steps nicer: this process and the actors alike.
        figures["niceness_measured"] = os.nice(args.nice)
        if not args.ray_only:
            figures["in_process"] = run(cfg, Path(tmp) / "memory", None)
            print(json.dumps(figures, indent=2), flush=True)
        figures["ray"] = run(cfg, Path(tmp) / "ray", address)
    figures["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    memory, on_ray = figures.get("in_process"), figures["ray"]
    if memory and memory["steady_rounds_per_s"] and on_ray["steady_rounds_per_s"]:
        figures["ray_over_in_process_round_time"] = round(
            on_ray["steady_s_per_round"] / memory["steady_s_per_round"], 2
        )
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

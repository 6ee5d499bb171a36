"""Benchmark: what the weight advisor's statistics add, without a live model.

    python -m bench.bench_advisor run                  # every weighting x noise (iid)
    python -m bench.bench_advisor run --dirichlet 0.3  # label-skewed split
    python -m bench.bench_advisor table [--dirichlet 0.3]

Runs `flq simulate`'s engine with bench/configs/advisor-digits.toml. Worker w9 trains on wrong
labels: `random` (every label drawn uniformly from the 10 classes) or `shift` (label y becomes
(y + 1) mod 10: a systematic mix-up, as a mislabelled sensor would make); `none` is the clean
fleet. Each noise runs with `flq_algorithm.weighting = "samples"` (FedAvg) and `"agreement"`: the
deterministic rule on the statistics the LLM advisor is shown (flq/algorithm/update_stats.py),
in the advisor's place. Each run writes docs/results/advisor-digits/<weighting>-<noise>[-dir<a>]/
(rounds.csv, config.toml, summary.json with w9's mean aggregation weight).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_accuracy import machine
from flq.config import Config, dumps_toml, load_config, with_overrides

CONFIG = Path(__file__).parent / "configs" / "advisor-digits.toml"
RESULTS = Path("docs/results/advisor-digits")
WEIGHTINGS = ("samples", "agreement")
NOISES = ("none", "random", "shift")
NOISY = 9  # w9
EARLY_ROUND = 10


def corrupt(labels: np.ndarray, noise: str, classes: int, seed: int) -> np.ndarray:
    if noise == "random":
        rng = np.random.default_rng([seed, 13])
        return rng.integers(0, classes, size=labels.shape).astype(labels.dtype)
    if noise == "shift":
        return ((labels + 1) % classes).astype(labels.dtype)
    raise ValueError(f"unknown noise {noise!r}: expected one of {NOISES[1:]}")


def noisy_trainer(cfg: Config, index: int, noise: str) -> Any:
    """The trainer `build_trainer` would make for worker `index`, on corrupted labels."""
    from flq.learning.data import ArrayData, load_dataset
    from flq.learning.lora import LoraSpec
    from flq.learning.partition import load_worker_partition
    from flq.learning.trainer import LocalTrainer
    from flq.worker.training import PartitionTrainer

    data = cfg.dataset
    spec, _, _ = load_dataset(
        data.name, data.data_dir, test_fraction=data.test_fraction, seed=cfg.system.seed
    )
    part = load_worker_partition(
        data.name,
        data.data_dir,
        num_workers=cfg.system.total_workers,
        index=index,
        scheme=data.partition,
        dir_alpha=data.dir_alpha,
        shards_per_worker=data.shards_per_worker,
        seed=cfg.system.seed,
        test_fraction=data.test_fraction,
    )
    labels = corrupt(part.y, noise, spec.num_classes, cfg.system.seed)
    trainer = LocalTrainer(
        cfg.model.name,
        spec,
        ArrayData(part.x, labels),
        hidden_units=cfg.model.hidden_units,
        seed=cfg.system.seed + index,
        model_seed=cfg.system.seed,
        lora=LoraSpec(),
    )
    return PartitionTrainer(trainer, len(labels))


def run_one(weighting: str, noise: str, rounds: int | None, dirichlet: float) -> dict[str, Any]:
    from flq.sim import build_trainers, simulate

    name = f"{weighting}-{noise}{_skew_tag(dirichlet)}"
    run_dir = RESULTS / name
    overrides: dict[str, Any] = {
        "flq_algorithm.weighting": weighting,
        "logging.result_dir": str(run_dir),
    }
    if dirichlet:
        overrides.update({"dataset.partition": "dirichlet", "dataset.dir_alpha": dirichlet})
    if rounds:
        overrides["system.max_rounds"] = rounds
    cfg = with_overrides(load_config(CONFIG), overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_toml(cfg), encoding="utf-8")
    trainers = build_trainers(cfg)
    if noise != "none":
        trainers[NOISY] = noisy_trainer(cfg, NOISY, noise)
    started = time.perf_counter()
    result = simulate(cfg, run_dir, trainers=trainers)
    (run_dir / "rounds.xlsx").unlink(missing_ok=True)  # keep docs/results small: csv only
    rows = _rows(run_dir)
    summary = {
        "run": name,
        "weighting": weighting,
        "noise": noise,
        "dirichlet": dirichlet,
        "rounds": result.rounds,
        "accuracy": result.accuracy,
        "noisy_worker_mean_weight": _mean_weight(rows, f"w{NOISY}"),
        "noisy_worker_sample_share": trainers[NOISY].num_samples
        / sum(t.num_samples for t in trainers),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return summary


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "rounds.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _mean_weight(rows: list[dict[str, str]], worker: str) -> float:
    """The worker's aggregation weight averaged over the rounds (0 where it had none)."""
    weights = []
    for row in rows:
        cells = dict(c.split(":") for c in row["weights_used"].split(";") if c)
        weights.append(float(cells.get(worker, 0.0)))
    return float(np.mean(weights)) if weights else float("nan")


def _skew_tag(dirichlet: float) -> str:
    return f"-dir{dirichlet:g}" if dirichlet else ""


def table(dirichlet: float = 0.0) -> str:
    """Accuracy at EARLY_ROUND / at the end and w9's mean weight, per weighting and noise."""
    tag = _skew_tag(dirichlet)
    lines = ["| weighting | " + " | ".join(NOISES) + " |", "|---|" + "---|" * len(NOISES)]
    for weighting in WEIGHTINGS:
        cells = [_cell(RESULTS / f"{weighting}-{noise}{tag}") for noise in NOISES]
        lines.append(f"| {weighting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(run_dir: Path) -> str:
    if not (run_dir / "rounds.csv").exists():
        return "—"
    rows = _rows(run_dir)
    if not rows or not (run_dir / "summary.json").exists():
        return "—"  # still running (the bench writes summary.json last)
    by_round = {int(r["round"]): float(r["accuracy"]) for r in rows}
    early, last = by_round.get(EARLY_ROUND, float("nan")), by_round[max(by_round)]
    return f"{early:.3f} / {last:.3f} (w9 {_mean_weight(rows, f'w{NOISY}'):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--weightings", default=",".join(WEIGHTINGS))
    run.add_argument("--noises", default=",".join(NOISES))
    run.add_argument("--rounds", type=int, default=None)
    for command in (run, sub.add_parser("table")):
        command.add_argument("--dirichlet", type=float, default=0.0, help="label skew; 0 = iid")
    args = parser.parse_args()
    if args.command == "table":
        print(table(args.dirichlet))
        return
    for noise in args.noises.split(","):
        for weighting in args.weightings.split(","):
            run_one(weighting, noise, args.rounds, args.dirichlet)


if __name__ == "__main__":
    main()

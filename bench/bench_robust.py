"""Benchmark: robust aggregation rules against one attacker among 10 workers (digits).

    python -m bench.bench_robust run                       # every rule x attack (+ screen rows)
    python -m bench.bench_robust run --rules median --attacks flip10 --rounds 20
    python -m bench.bench_robust table                     # markdown for docs/benchmarks.md
    python -m bench.bench_robust run --dirichlet 0.3 --attacks none,flip10   # label-skewed
    python -m bench.bench_robust table --dirichlet 0.3

Runs `flq simulate`'s engine with bench/configs/robust-digits.toml. Worker w9 trains honestly and
then multiplies its update by the attack's factor before the normal protocol quantizes and sends
it (so the attack meets stale reuse and quantized innovations exactly as a real bad board's
would). Screening (aggregation.screen_factor) is off in the rule x attack grid, so each rule is
measured alone; the `screen` rows show the default screen (10 x median) with the mean.
Each run writes docs/results/robust-digits/<rule>-<attack>[-screen][-dir<alpha>]/ (rounds.csv,
config.toml, summary.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_accuracy import machine
from flq.config import dumps_toml, load_config, with_overrides
from flq.learning.trainer import TrainResult, TrainSpec

CONFIG = Path(__file__).parent / "configs" / "robust-digits.toml"
RESULTS = Path("docs/results/robust-digits")
RULES = ("mean", "trimmed_mean", "median", "norm_clipped")
ATTACKS = {"none": 1.0, "flip1": -1.0, "flip10": -10.0, "scale10": 10.0, "scale100": 100.0}
SCREEN_RUNS = (("mean", "flip10"), ("mean", "scale100"))
FACTORS = ATTACKS
EARLY_ROUND = 10  # the table shows accuracy here and at the end: robust rules can cost speed
ATTACKER = 9  # w9


@dataclass
class Attacker:
    """An honest trainer whose update is multiplied by `factor` before it is sent."""

    inner: Any
    factor: float

    @property
    def num_samples(self) -> int:
        return int(self.inner.num_samples)

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> TrainResult:
        result: TrainResult = self.inner.train(weights, spec)
        factor = np.float32(self.factor)
        return replace(result, delta=[(d * factor).astype(np.float32) for d in result.delta])


def run_one(
    rule: str, attack: str, screen: bool, rounds: int | None, dirichlet: float = 0.0
) -> dict[str, Any]:
    from flq.sim import build_trainers, simulate

    name = f"{rule}-{attack}" + ("-screen" if screen else "") + _skew_tag(dirichlet)
    overrides: dict[str, Any] = {"aggregation.rule": rule}
    if dirichlet:
        overrides["dataset.partition"] = "dirichlet"
        overrides["dataset.dir_alpha"] = dirichlet
    if screen:
        overrides["aggregation.screen_factor"] = 10.0
    if rounds:
        overrides["system.max_rounds"] = rounds
    run_dir = RESULTS / name
    overrides["logging.result_dir"] = str(run_dir)
    cfg = with_overrides(load_config(CONFIG), overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_toml(cfg), encoding="utf-8")
    trainers = build_trainers(cfg)
    if FACTORS[attack] != 1.0:
        trainers[ATTACKER] = Attacker(trainers[ATTACKER], FACTORS[attack])
    started = time.perf_counter()
    result = simulate(cfg, run_dir, trainers=trainers)
    (run_dir / "rounds.xlsx").unlink(missing_ok=True)  # keep docs/results small: csv only
    summary = {
        "run": name,
        "rule": rule,
        "attack": attack,
        "screen": screen,
        "rounds": result.rounds,
        "accuracy": result.accuracy,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return summary


def _skew_tag(dirichlet: float) -> str:
    return f"-dir{dirichlet:g}" if dirichlet else ""


def table(dirichlet: float = 0.0) -> str:
    """Accuracy at EARLY_ROUND / at the end, per rule and attack (— where a run is missing)."""
    tag = _skew_tag(dirichlet)
    attacks = [a for a in ATTACKS if any((RESULTS / f"{r}-{a}{tag}").exists() for r in RULES)]
    lines = [
        "| rule | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for rule in RULES:
        cells = [_accuracies(RESULTS / f"{rule}-{attack}{tag}") for attack in attacks]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    if dirichlet:
        return "\n".join(lines)
    lines += ["", "| rule, screen 10 x median | attack | accuracy |", "|---|---|---|"]
    for rule, attack in SCREEN_RUNS:
        lines.append(f"| {rule} | {attack} | {_accuracies(RESULTS / f'{rule}-{attack}-screen')} |")
    return "\n".join(lines)


def _accuracies(run_dir: Path) -> str:
    path = run_dir / "rounds.csv"
    if not path.exists():
        return "—"
    with path.open(newline="") as handle:
        by_round = {int(r["round"]): r["accuracy"] for r in csv.DictReader(handle)}
    early, last = by_round.get(EARLY_ROUND, "nan"), by_round[max(by_round)]
    return f"{float(early):.3f} / {float(last):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--rules", default=",".join(RULES))
    run.add_argument("--attacks", default=",".join(ATTACKS))
    run.add_argument("--rounds", type=int, default=None)
    run.add_argument("--no-screen-runs", action="store_true")
    for command in (run, sub.add_parser("table")):
        command.add_argument(
            "--dirichlet", type=float, default=0.0, help="label skew (alpha); 0 = iid, the default"
        )
    args = parser.parse_args()
    if args.command == "table":
        print(table(args.dirichlet))
        return
    for rule in args.rules.split(","):
        for attack in args.attacks.split(","):
            run_one(rule, attack, screen=False, rounds=args.rounds, dirichlet=args.dirichlet)
    if not args.no_screen_runs and not args.dirichlet:
        for rule, attack in SCREEN_RUNS:
            run_one(rule, attack, screen=True, rounds=args.rounds)


if __name__ == "__main__":
    main()

"""Plots from results: accuracy against round and against cumulative uplink bits, a line per run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from flq.master.results import read_rounds


@dataclass(frozen=True)
class RunCurve:
    label: str
    rounds: list[int]
    accuracy: list[float]
    cum_uplink_bits: list[float]


def load_curve(path: str | os.PathLike[str], label: str | None = None) -> RunCurve:
    """Read a rounds.csv (or a run directory holding one); rounds never evaluated are dropped."""
    source = Path(path)
    csv_path = source / "rounds.csv" if source.is_dir() else source
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path}: no rounds.csv (pass a run directory or the csv)")
    rounds, accuracy, cum_bits = [], [], []
    total = 0.0
    for row in read_rounds(csv_path):
        total += float(row["uplink_bits"] or 0)
        acc = float(row["accuracy"]) if row["accuracy"] not in ("", "nan") else math.nan
        if math.isnan(acc):
            continue
        rounds.append(int(row["round"]))
        accuracy.append(acc)
        cum_bits.append(total)
    name = label or (source.name if source.is_dir() else source.parent.name)
    return RunCurve(name, rounds, accuracy, cum_bits)


def plot_curves(curves: list[RunCurve], out: str | os.PathLike[str], title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on boards and CI
    import matplotlib.pyplot as plt

    fig, (by_round, by_bits) = plt.subplots(1, 2, figsize=(11, 4.2))
    for curve in curves:
        by_round.plot(curve.rounds, curve.accuracy, label=curve.label)
        by_bits.plot(curve.cum_uplink_bits, curve.accuracy, label=curve.label)
    by_round.set_xlabel("round")
    by_bits.set_xlabel("cumulative uplink bits")
    by_bits.set_xscale("symlog")
    for axis in (by_round, by_bits):
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target

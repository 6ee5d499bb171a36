"""Knowledge fusion (issue 15): the teacher, and the table and figure of the fusion runs.

    python -m bench.bench_fusion teacher            # train the teacher on the master's 10 %
    python -m bench.bench_accuracy run fusion-fmnist-none fusion-fmnist-distill fusion-fmnist-pa
    python -m bench.bench_fusion table --plot docs/img/fmnist-fusion.png

The teacher (flq/learning/teacher.py: a wider CNN, ~1.35M parameters) is trained on the same
10 % share of the Fashion-MNIST training set the master fuses on (fusion.server_share, seed 42),
which no worker holds in any of the runs. Its file stays out of git (results/fusion/); its report
(test accuracy: the ceiling of what fusion can pass on) goes to
docs/results/fusion-fmnist-teacher.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.bench_accuracy import RESULTS, _sci, evaluated_curve, machine, run_stats

TEACHER = Path("results/fusion/teacher-fmnist.keras")
TEACHER_REPORT = RESULTS / "fusion-fmnist-teacher.json"
RUNS = ("fusion-fmnist-none", "fusion-fmnist-distill", "fusion-fmnist-pa")
SEED = 42
SHARE = 0.1
EPOCHS = 8


def teacher() -> dict[str, object]:
    from flq.learning.teacher import train_teacher

    if not TEACHER.exists():
        train_teacher(
            TEACHER, dataset="fashion-mnist", server_share=SHARE, seed=SEED, epochs=EPOCHS
        )
    report = json.loads(TEACHER.with_suffix(".json").read_text())
    report["machine"] = machine()
    TEACHER_REPORT.write_text(json.dumps(report, indent=2) + "\n")
    return dict(report)


def _fusion_seconds(run_dir: Path) -> tuple[int, int, float]:
    """(fusions applied, skipped, mean seconds of a fusion)."""
    import csv

    with (run_dir / "rounds.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("fusion")]
    applied = [r for r in rows if r["fusion"] == "applied"]
    seconds = [float(r["fusion_seconds"]) for r in rows]
    return len(applied), len(rows) - len(applied), sum(seconds) / len(seconds) if seconds else 0.0


def table(run_dirs: list[Path], ceiling: float) -> str:
    lines = [
        "| run | rounds run | best acc | final acc | round to 80% | round to 85% "
        "| uplink bits to 80% | fusions applied / skipped | s per fusion | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_dir in run_dirs:
        s = run_stats(run_dir)
        applied, skipped, seconds = _fusion_seconds(run_dir)
        lines.append(
            f"| {s.name} | {s.rounds} | {s.best:.4f} | {s.final:.4f} | {s.round_to_80 or '—'} "
            f"| {s.round_to_85 or '—'} | {_sci(s.up_bits_to_80)} | {applied} / {skipped} "
            f"| {seconds:.2f} | {s.wall_s:.0f} |"
        )
    lines.append(f"| teacher (ceiling) | — | {ceiling:.4f} | {ceiling:.4f} | | | | | | |")
    return "\n".join(lines)


def plot(run_dirs: list[Path], ceiling: float, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bits) = plt.subplots(1, 2, figsize=(12, 4.6))
    for run_dir in run_dirs:
        rounds, accuracy, bits = evaluated_curve(run_dir)
        by_round.plot(rounds, accuracy, marker=".", label=run_dir.name)
        by_bits.plot(bits, accuracy, marker=".")
    for axis in (by_round, by_bits):
        axis.axhline(ceiling, color="black", lw=0.9, ls="--")
        axis.axhline(0.85, color="grey", lw=0.8, ls=":")
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    by_round.set_xlabel("round (dashed: the teacher's accuracy; dotted: 85 %)")
    by_bits.set_xlabel("cumulative uplink bits")
    fig.legend(fontsize=8, loc="lower center", ncol=len(run_dirs), frameon=False)
    fig.suptitle("Fashion-MNIST, 10 workers, Dirichlet 0.1: knowledge fusion on the master")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("teacher", help="train the teacher (if missing) and write its report")
    table_parser = sub.add_parser("table", help="markdown table (and figure) of the runs")
    table_parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "teacher":
        print(json.dumps(teacher(), indent=2))
        return 0
    ceiling = float(json.loads(TEACHER_REPORT.read_text())["test_accuracy"])
    run_dirs = [RESULTS / run for run in RUNS if (RESULTS / run / "summary.json").exists()]
    print(table(run_dirs, ceiling))
    if args.plot is not None:
        print(f"wrote {plot(run_dirs, ceiling, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

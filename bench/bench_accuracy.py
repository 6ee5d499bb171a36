"""Benchmark 1: communication to accuracy, through `flq simulate` (the daemons' round engine).

    python -m bench.bench_accuracy run fmnist-bin fmnist-bin-lazy   # configs in bench/configs/
    python -m bench.bench_accuracy run fmnist                        # every fmnist-* config
    python -m bench.bench_accuracy run fmnist-bin-lazy --set lazy_selection.thr_scale=4 \
        --tag thr4 --rounds 200                                      # a sweep point
    python -m bench.bench_accuracy table fmnist --plot docs/img/fmnist-accuracy.png
    python -m bench.bench_accuracy run laq-gd laq-qgd laq-laq        # the LAQ paper's setting
    python -m bench.bench_accuracy laq laq-gd laq-qgd laq-laq        # its table + loss plot
    python -m bench.bench_accuracy curves fmnist-stc-p1 fmnist-bin --every 25  # runs in flight too

Each run writes docs/results/<run>[-<tag>]/: rounds.csv (the daemons' format), config.toml (the
resolved config, every default filled in) and summary.json (wall time, machine). `table` reads
them back, so every figure in docs/benchmarks.md can be re-derived from the committed CSVs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flq.config import Config, dumps_toml, load_config, with_overrides

CONFIGS = Path(__file__).parent / "configs"
RESULTS = Path("docs/results")
IMAGES = Path("docs/img")

# The original FLQ's best figures (DESIGN.md, "Reference results to beat").
ORIGINAL_BEST_BITS_TO_85 = 3.62e9  # bin
ORIGINAL_BEST_ROUNDS_TO_85 = 350  # bbit
GOAL_UPLINK_BITS_TO_85 = 5e8  # issue 12: 85 % with at most this many uplink bits
# One float32 upload of the Fashion-MNIST CNN (467,818 parameters), beside which bits per
# upload are reported.
FLOAT32_UPLOAD_BITS = 32 * 467_818


def machine() -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(pages / 2**30, 1),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def config_paths(names: list[str]) -> list[Path]:
    """`fmnist` expands to every bench/configs/fmnist-*.toml; a full name picks one file."""
    paths: list[Path] = []
    for name in names:
        exact = CONFIGS / f"{name}.toml"
        found = [exact] if exact.exists() else sorted(CONFIGS.glob(f"{name}-*.toml"))
        if not found:
            raise SystemExit(f"no config {exact} and no {name}-*.toml in {CONFIGS}")
        paths += found
    return paths


def parse_sets(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, text = item.partition("=")
        overrides[key] = json.loads(text) if text[:1] not in ('"', "") else text.strip('"')
    return overrides


def trace_lazy_rule(out: Path) -> Any:
    """Record, for every prepared upload, the terms of the lazy rule (for choosing thr_scale).

    A worker uploads iff energy > thr_scale * (movement + 3 (err_sq + err_ref)), so
    ratio = energy / (movement + 3 (err_sq + err_ref)) is the largest thr_scale at which this
    offer would still have been made. Written to lazy_trace.csv in the run directory.
    """
    from flq.algorithm.reference import UploadReference

    original = UploadReference.prepare
    handle = out.open("w", newline="")
    writer = csv.writer(handle)
    writer.writerow(["round", "reference", "energy", "err_sq", "err_ref", "movement", "ratio"])

    def prepare(self: Any, update: Any, round_index: int, rng: Any) -> Any:
        prepared = original(self, update, round_index, rng)
        lazy = self.settings.lazy
        movement = lazy.ck / lazy.history * sum(list(self.history)[-lazy.history :])
        base = movement + 3.0 * (prepared.err_sq + self.err_sq)
        ratio = prepared.energy / base if base > 0 else math.inf
        writer.writerow(
            [
                round_index + 1,
                id(self) % 100003,
                f"{prepared.energy:.6g}",
                f"{prepared.err_sq:.6g}",
                f"{self.err_sq:.6g}",
                f"{movement:.6g}",
                f"{ratio:.6g}",
            ]
        )
        return prepared

    UploadReference.prepare = prepare  # type: ignore[method-assign]

    def close() -> None:
        UploadReference.prepare = original  # type: ignore[method-assign]
        handle.close()

    return close


def run_one(
    path: Path, overrides: dict[str, Any], tag: str, out_root: Path, trace: bool = False
) -> Path:
    from flq.log import configure_logging
    from flq.sim import simulate

    cfg: Config = load_config(path)
    if overrides:
        cfg = with_overrides(cfg, overrides)
    name = path.stem + (f"-{tag}" if tag else "")
    run_dir = out_root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(
        f"# {path.name} with {json.dumps(overrides)}\n" + dumps_toml(cfg)
    )
    configure_logging("warning", "json")
    tracer = trace_lazy_rule(run_dir / "lazy_trace.csv") if trace else None
    began = time.perf_counter()
    rows = 0

    def progress(row: dict[str, Any]) -> None:
        nonlocal rows
        rows += 1
        if row["accuracy"] != "nan" and int(row["round"]) % cfg.system.eval_every == 0:
            print(
                f"{name} round {row['round']} acc {row['accuracy']} up {row['cum_uplink_bits']}"
                f" skip {row['skipped']} {time.perf_counter() - began:.0f}s",
                flush=True,
            )

    result = simulate(cfg, run_dir, on_round=progress)
    if tracer is not None:
        tracer()
    wall = time.perf_counter() - began
    (run_dir / "rounds.xlsx").unlink(missing_ok=True)  # keep docs/results small: csv only
    summary = {
        "run": name,
        "config": os.path.relpath(path),
        "overrides": overrides,
        "rounds": result.rounds,
        "accuracy": result.accuracy,
        "uplink_bits": result.uplink_bits,
        "downlink_bits": result.downlink_bits,
        "wire_bytes": result.wire_bytes,
        "wall_s": round(wall, 1),
        "machine": machine(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{name}: done {json.dumps(summary)}", flush=True)
    return run_dir


# ---------------------------------------------------------------- reading the runs back


@dataclass(frozen=True)
class RunStats:
    name: str
    mode: str
    thr_scale: float
    rounds: int
    best: float
    final: float
    round_to_80: int | None
    up_bits_to_80: float | None
    round_to_85: int | None
    up_bits_to_85: float | None
    down_bits_to_85: float | None
    total_bits_to_85: float | None
    up_bits: float
    uploads: int
    skipped: int
    offers: int
    wall_s: float | None  # None: the run was cut before its end (no summary.json)


def first_round(rows: list[dict[str, str]], level: float) -> int | None:
    for row in rows:
        if _acc(row) >= level:
            return int(row["round"])
    return None


def _acc(row: dict[str, str]) -> float:
    text = row["accuracy"]
    return float(text) if text not in ("", "nan") else -math.inf


def bits_through(rows: list[dict[str, str]], last: int | None, key: str) -> float | None:
    if last is None:
        return None
    return float(sum(int(r[key]) for r in rows if int(r["round"]) <= last))


def _summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def run_stats(run_dir: Path) -> RunStats:
    with (run_dir / "rounds.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = _summary(run_dir) if (run_dir / "summary.json").exists() else {}
    cfg = load_config(run_dir / "config.toml")
    evaluated = [r for r in rows if _acc(r) > -math.inf]
    r80 = first_round(rows, 0.80)
    r85 = first_round(rows, 0.85)
    up85 = bits_through(rows, r85, "uplink_bits")
    down85 = bits_through(rows, r85, "downlink_bits")
    return RunStats(
        name=run_dir.name,
        mode=cfg.flq_algorithm.mode,
        thr_scale=cfg.lazy_selection.thr_scale,
        rounds=len(rows),
        best=max(_acc(r) for r in evaluated),
        final=_acc(evaluated[-1]),
        round_to_80=r80,
        up_bits_to_80=bits_through(rows, r80, "uplink_bits"),
        round_to_85=r85,
        up_bits_to_85=up85,
        down_bits_to_85=down85,
        total_bits_to_85=None if up85 is None or down85 is None else up85 + down85,
        up_bits=float(sum(int(r["uplink_bits"]) for r in rows)),
        uploads=sum(int(r["selected"]) for r in rows),
        skipped=sum(int(r["skipped"]) for r in rows),
        offers=sum(int(r["participants"] or 0) for r in rows),
        wall_s=float(summary["wall_s"]) if "wall_s" in summary else None,
    )


def _sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _int(value: int | None) -> str:
    return "—" if value is None else str(value)


def markdown_table(stats: list[RunStats]) -> str:
    lines = [
        "| run | mode | thr_scale | rounds run | best acc | final acc | round to 80% "
        "| uplink bits to 80% | round to 85% | uplink bits to 85% | downlink bits to 85% "
        "| total bits to 85% | bits per upload (float32 / it) | uploads skipped / offers "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        skipped = f"{s.skipped} / {s.offers}" if s.offers else str(s.skipped)
        per_upload = s.up_bits / s.uploads if s.uploads else None
        ratio = f" ({FLOAT32_UPLOAD_BITS / per_upload:.0f}x)" if per_upload else ""
        lines.append(
            f"| {s.name} | {s.mode} | {s.thr_scale:g} | {s.rounds} | {s.best:.4f} | "
            f"{s.final:.4f} | {_int(s.round_to_80)} | {_sci(s.up_bits_to_80)} | "
            f"{_int(s.round_to_85)} | {_sci(s.up_bits_to_85)} | {_sci(s.down_bits_to_85)} | "
            f"{_sci(s.total_bits_to_85)} | {_sci(per_upload)}{ratio} | {skipped} | "
            f"{'cut' if s.wall_s is None else f'{s.wall_s:.0f}'} |"
        )
    return "\n".join(lines)


def curves_table(run_dirs: list[Path], every: int) -> str:
    """Accuracy and cumulative uplink / downlink bits every `every` rounds, side by side, for
    runs finished or still in flight (rounds.csv only)."""
    columns = []
    for run_dir in run_dirs:
        with (run_dir / "rounds.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        up = down = 0.0
        points: dict[int, str] = {}
        for row in rows:
            up += float(row["uplink_bits"])
            down += float(row["downlink_bits"])
            if int(row["round"]) % every == 0 and _acc(row) > -math.inf:
                points[int(row["round"])] = f"{_acc(row):.3f} / {up:.3g} / {down:.3g}"
        columns.append(points)
    rounds = sorted({r for points in columns for r in points})
    lines = [
        "| round | " + " | ".join(d.name for d in run_dirs) + " |",
        "|---:|" + "---|" * len(run_dirs),
    ]
    for r in rounds:
        lines.append(f"| {r} | " + " | ".join(c.get(r, "") for c in columns) + " |")
    return "\n".join(lines)


def verdict(stats: list[RunStats]) -> str:
    lines = []
    for s in stats:
        if s.round_to_85 is None or s.up_bits_to_85 is None:
            lines.append(f"- {s.name}: did not reach 85% in {s.rounds} rounds")
            continue
        bits_ok = s.up_bits_to_85 <= ORIGINAL_BEST_BITS_TO_85 / 2
        rounds_ok = s.round_to_85 < ORIGINAL_BEST_ROUNDS_TO_85
        lines.append(
            f"- {s.name}: {s.up_bits_to_85 / ORIGINAL_BEST_BITS_TO_85:.1%} of the original's "
            f"best uplink bits ({'meets' if bits_ok else 'misses'} <= 50%), "
            f"{s.round_to_85} rounds ({'meets' if rounds_ok else 'misses'} < 350); "
            f"{s.up_bits_to_85:.3g} uplink bits "
            f"({'meets' if s.up_bits_to_85 <= GOAL_UPLINK_BITS_TO_85 else 'misses'} <= 5e8)"
        )
    return "\n".join(lines)


def evaluated_curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """(round, accuracy, cumulative uplink bits) at the rounds the run evaluated."""
    cfg = load_config(run_dir / "config.toml")
    with (run_dir / "rounds.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rounds, accuracy, bits, total = [], [], [], 0.0
    for row in rows:
        total += float(row["uplink_bits"])
        if int(row["round"]) % cfg.system.eval_every == 0 and _acc(row) > -math.inf:
            rounds.append(int(row["round"]))
            accuracy.append(_acc(row))
            bits.append(total)
    return rounds, accuracy, bits


def plot(run_dirs: list[Path], out: Path, title: str) -> Path:
    """Accuracy against round and against cumulative uplink bits, with the targets drawn in:
    85%, the original's best rounds (350) and best bits (3.62e9) and half of those bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bits) = plt.subplots(1, 2, figsize=(14, 5.2))
    palette = plt.get_cmap("tab20").colors  # one colour per run, up to 20 runs
    for index, run_dir in enumerate(run_dirs):
        rounds, accuracy, bits = evaluated_curve(run_dir)
        style = "--" if "lazy" in run_dir.name else "-"
        colour = palette[index % len(palette)]
        by_round.plot(rounds, accuracy, style, lw=1.1, color=colour, label=run_dir.name)
        by_bits.plot(bits, accuracy, style, lw=1.1, color=colour)
    for axis in (by_round, by_bits):
        axis.axhline(0.85, color="grey", lw=0.8, ls=":")
        axis.set_ylabel("test accuracy")
        axis.set_ylim(0.5, 0.88)
        axis.grid(alpha=0.3)
    by_round.axvline(ORIGINAL_BEST_ROUNDS_TO_85, color="grey", lw=0.8, ls=":")
    by_round.set_xlabel("round (grey: 85%, original's best 350 rounds)")
    by_bits.axvline(ORIGINAL_BEST_BITS_TO_85, color="grey", lw=0.8, ls=":")
    by_bits.axvline(ORIGINAL_BEST_BITS_TO_85 / 2, color="black", lw=0.8, ls=":")
    by_bits.set_xscale("log")
    by_bits.set_xlabel("cumulative uplink bits (grey: original's best 3.62e9; black: target)")
    fig.legend(fontsize=8, loc="center right", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- the LAQ setting: loss curves


def loss_curves(run_dir: Path) -> tuple[list[int], list[float], list[float], int, int]:
    """(rounds, training loss, cumulative uplink bits, uploads, skipped) of one run. The training
    loss is the sample-weighted mean each worker reports for the model it was sent: with full
    local gradients that is the global objective f(theta^k) at every iteration."""
    with (run_dir / "rounds.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rounds, losses, bits = [], [], []
    total = 0.0
    for row in rows:
        total += float(row["uplink_bits"])
        rounds.append(int(row["round"]))
        losses.append(float(row["train_loss"]))
        bits.append(total)
    uploads = sum(int(r["selected"]) for r in rows)
    skipped = sum(int(r["skipped"]) for r in rows)
    return rounds, losses, bits, uploads, skipped


def laq_report(run_dirs: list[Path], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {d.name: loss_curves(d) for d in run_dirs}
    # A loss every run reaches: 1% above the worst run's final loss.
    level = max(c[1][-1] for c in curves.values()) * 1.01
    fig, (by_iter, by_bits) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = [
        f"| run | iterations | final loss | uploads | skipped | uplink bits "
        f"| iterations to loss {level:.4f} | uplink bits to loss {level:.4f} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (rounds, losses, bits, uploads, skipped) in curves.items():
        by_iter.plot(rounds, losses, label=name)
        by_bits.plot(bits, losses, label=name)
        hit = next((i for i, loss in enumerate(losses) if loss <= level), None)
        lines.append(
            f"| {name} | {rounds[-1]} | {losses[-1]:.4f} | {uploads} | {skipped} | "
            f"{bits[-1]:.3g} | {'—' if hit is None else rounds[hit]} | "
            f"{'—' if hit is None else f'{bits[hit]:.3g}'} |"
        )
    by_iter.set_xlabel("iteration")
    by_bits.set_xlabel("cumulative uplink bits")
    by_bits.set_xscale("log")
    for axis in (by_iter, by_bits):
        axis.set_ylabel("training loss f(theta)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    fig.suptitle("LAQ setting: softmax regression, Fashion-MNIST, 10 workers, full gradients")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def lazy_terms(trace: Path, window: int = 50) -> list[dict[str, float]]:
    """Medians of the lazy rule's terms per window of rounds, from a run's lazy_trace.csv:
    energy ||dQ||^2, the movement term sum(xi h), 3||eps||^2, 3||eps_hat||^2 and their ratio (the
    largest thr_scale at which an offer is still made). Small enough to commit beside rounds.csv."""
    with trace.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    windows: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        windows.setdefault((int(row["round"]) - 1) // window, []).append(row)
    summary = []
    for index, members in sorted(windows.items()):

        def median(key: str, scale: float = 1.0, rows: list[dict[str, str]] = members) -> float:
            return float(statistics.median(scale * float(r[key]) for r in rows))

        summary.append(
            {
                "rounds": f"{index * window + 1}-{(index + 1) * window}",
                "offers": len(members),
                "energy": median("energy"),
                "movement": median("movement"),
                "3_err_sq": median("err_sq", 3.0),
                "3_err_ref": median("err_ref", 3.0),
                "ratio": median("ratio"),
            }
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run configs from bench/configs")
    run.add_argument("names", nargs="+")
    run.add_argument("--set", action="append", default=[], help="section.key=value (JSON value)")
    run.add_argument("--tag", default="", help="suffix for the run directory (sweeps)")
    run.add_argument("--rounds", type=int, help="override system.max_rounds")
    run.add_argument("--out", type=Path, default=RESULTS)
    run.add_argument("--trace", action="store_true", help="write lazy_trace.csv (rule terms)")
    table = sub.add_parser("table", help="markdown table and plot of finished runs")
    table.add_argument("names", nargs="+", help="run directory names or prefixes")
    table.add_argument("--out", type=Path, default=RESULTS)
    table.add_argument("--plot", type=Path, help="image to draw (accuracy vs round and bits)")
    laq = sub.add_parser("laq", help="LAQ-setting table and loss plot (iterations, bits)")
    laq.add_argument("names", nargs="+", help="run directory names")
    laq.add_argument("--out", type=Path, default=RESULTS)
    laq.add_argument("--plot", type=Path, default=IMAGES / "laq-loss.png")
    curves = sub.add_parser(
        "curves", help="accuracy / cumulative uplink / downlink bits every N rounds, any run"
    )
    curves.add_argument("names", nargs="+", help="run directory names")
    curves.add_argument("--out", type=Path, default=RESULTS)
    curves.add_argument("--every", type=int, default=50)
    terms = sub.add_parser("lazy-terms", help="summarise a run's lazy_trace.csv into JSON")
    terms.add_argument("trace", type=Path, help="lazy_trace.csv written by run --trace")
    terms.add_argument("--json", type=Path, help="where to write the summary")
    args = parser.parse_args(argv)

    if args.command == "lazy-terms":
        text = json.dumps(lazy_terms(args.trace), indent=1)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return 0
    if args.command == "curves":
        print(curves_table([args.out / n for n in args.names], args.every))
        return 0
    if args.command == "laq":
        print(laq_report([args.out / n for n in args.names], args.plot))
        print(f"plot: {args.plot}")
        return 0
    if args.command == "run":
        overrides = parse_sets(args.set)
        if args.rounds:
            overrides["system.max_rounds"] = args.rounds
        for path in config_paths(args.names):
            run_one(path, overrides, args.tag, args.out, args.trace)
        return 0
    dirs: list[Path] = []
    for name in args.names:
        exact = args.out / name
        dirs += [exact] if exact.is_dir() else sorted(args.out.glob(f"{name}-*"))
    # Runs cut before their end (no summary.json) are reported too: "cut" in the wall column.
    dirs = [d for d in dirs if (d / "rounds.csv").exists() and (d / "config.toml").exists()]
    stats = [run_stats(d) for d in dirs]
    print(markdown_table(stats))
    print()
    print(verdict(stats))
    if args.plot:
        # Sweep points stopped by hand (summary "aborted") are in the table, not in the plot.
        finished = [
            d for d in dirs if not (d / "summary.json").exists() or "aborted" not in _summary(d)
        ]
        title = "Fashion-MNIST, CNN, 20 workers, Dirichlet 0.1, 17 Mbit/round uplink budget"
        print(f"plot: {plot(finished, args.plot, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

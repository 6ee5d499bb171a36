"""Progress and summaries on the terminal for long runs (rich)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flq.config import Config
from flq.demo import DemoOptions, DemoSummary, demo_config, run_demo

console = Console()
ROUND_COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "selected",
    "skipped",
    "failed",
    "uplink_bits",
    "seconds",
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _format_row(row: dict[str, str]) -> str:
    """One line per round, narrow enough for an 80-column terminal."""
    return (
        f"round {int(row['round']):>4}  acc {float(row['accuracy'] or 'nan'):.4f}"
        f"  loss {float(row['loss'] or 'nan'):.4f}"
        f"  up/skip/fail {row['selected']}/{row['skipped']}/{row['failed']}"
        f"  {int(row['uplink_bits']):>11,d} b  {float(row['seconds']):5.2f}s"
    )


def missing_key_warning(cfg: Config, environ: Mapping[str, str]) -> str | None:
    """Why an LLM-weighted run will only ever use sample weights, if it will."""
    key = cfg.llm.api_key_env
    if cfg.flq_algorithm.weighting != "llm" or environ.get(key):
        return None
    return f"${key} is not set: every round falls back to sample weights"


def run_demo_with_progress(options: DemoOptions) -> DemoSummary:
    cfg = demo_config(options)
    console.print(
        f"[bold]flq demo[/]: {cfg.system.total_workers} workers, "
        f"{cfg.system.max_rounds} rounds, {cfg.dataset.label}/{cfg.model.label}, "
        f"mode {cfg.flq_algorithm.mode} (b_up {cfg.flq_algorithm.b_up}, "
        f"b_down {cfg.flq_algorithm.b_down}), lazy thr {cfg.lazy_selection.thr_scale}"
    )
    missing = missing_key_warning(cfg, os.environ)
    if missing:  # said now, not after the run
        console.print(f"[yellow]warning[/]: {missing}")
    with _progress() as progress:
        task = progress.add_task("rounds", total=cfg.system.max_rounds, status="starting…")

        def on_round(row: dict[str, str]) -> None:
            progress.console.print(_format_row(row))
            progress.update(
                task,
                completed=int(row["round"]),
                status=f"acc {float(row['accuracy'] or 'nan'):.3f}",
            )

        summary = run_demo(options, on_round)
    _print_summary(summary)
    return summary


def _print_summary(summary: DemoSummary) -> None:
    table = Table(title="summary", show_header=False)
    table.add_row("final accuracy", f"{summary.final_accuracy:.4f}")
    table.add_row("best accuracy", f"{summary.best_accuracy:.4f}")
    table.add_row("uplink bits", f"{summary.uplink_bits:,d}")
    table.add_row("float32 FedAvg would send", f"{summary.float32_fedavg_bits:,d}")
    table.add_row("uplink vs float32", f"{summary.uplink_ratio:.2%}")
    if summary.exchanged_parameters != summary.total_parameters:
        table.add_row(
            "parameters sent / in model",
            f"{summary.exchanged_parameters:,d} / {summary.total_parameters:,d} (LoRA)",
        )
        table.add_row(
            "uplink bytes per upload",
            f"{summary.uplink_bytes_per_upload:,.0f} "
            f"(whole model: {summary.full_model_uplink_bytes_per_upload:,.0f})",
        )
    if set(summary.weights_sources) - {"samples", "uniform"}:
        sources = ", ".join(f"{k} {v}" for k, v in sorted(summary.weights_sources.items()))
        table.add_row("weights (rounds)", sources)
    if summary.fusion:
        results = ", ".join(f"{k} {v}" for k, v in sorted(summary.fusion.items()))
        table.add_row("fusion (rounds)", results)
    table.add_row("skipped uploads", str(summary.skipped_uploads))
    table.add_row("failed worker-rounds", str(summary.failed))
    table.add_row("wall time", f"{summary.seconds:.1f} s")
    table.add_row("results", summary.run_dir)
    console.print(table)


def run_simulation_with_progress(
    cfg: Config, run_dir: Path, ray_address: str | None = None
) -> None:
    from flq.sim import simulate

    with _progress() as progress:
        task = progress.add_task("rounds", total=cfg.system.max_rounds, status="building…")

        def on_round(row: dict[str, object]) -> None:
            progress.console.print(_format_row({k: str(v) for k, v in row.items()}))
            progress.update(
                task,
                completed=int(str(row["round"])),
                status=f"acc {float(str(row['accuracy'] or 'nan')):.3f}",
            )

        result = simulate(cfg, run_dir, on_round=on_round, ray_address=ray_address)
    console.print(
        f"done: {result.rounds} rounds, accuracy {result.accuracy:.4f}, "
        f"uplink {result.uplink_bits:,d} bits, results in {run_dir}"
    )

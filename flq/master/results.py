"""Per-round results: rounds.csv (appended and fsynced each round), xlsx when openpyxl exists.

The first columns are fixed (tools and the original FLQ spreadsheets read them by position):
round, accuracy, loss, selected, skipped, failed, uplink_bits, downlink_bits, wire_bytes, seconds.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from flq.master.outcome import RoundOutcome

log = structlog.get_logger("flq.master.results")
REASONING_CHARS = 240  # results and `flq status` keep one short line

FIXED_COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "selected",
    "skipped",
    "failed",
    "uplink_bits",
    "downlink_bits",
    "wire_bytes",
    "seconds",
)
EXTRA_COLUMNS = (
    "denied",
    "fresh",
    "participants",
    "train_loss",
    "lazy_scalar",
    "cum_uplink_bits",
    "weights_source",
    "failures",
    "weights_used",  # "w0:0.31;w1:0.69": the normalised aggregation weights
    "llm_confidence",  # weighting = "llm": the answer's confidence (empty otherwise)
    "llm_reasoning",  # weighting = "llm": its reasoning, or why it fell back (one line)
    "rejected",  # "w3:update norm ... > 10 x median ...": refused uploads and sessions, and why
    "fusion",  # [fusion]: applied, skipped:<reason>, or empty when no fusion was due
    "fusion_loss",  # the fusion's server-side loss (mean over its steps)
    "fusion_seconds",  # the fusion's wall time, in the master's process
    "train_s_median",  # the median of the workers' local training times this round (offers)
    "train_s_max",  # the slowest worker's local training time ...
    "slowest",  # ... and who it was
)
COLUMNS = FIXED_COLUMNS + EXTRA_COLUMNS
ROUNDS_CSV = "rounds.csv"  # in the run directory


def round_row(
    outcome: RoundOutcome, accuracy: float, loss: float, *, cum_uplink_bits: int
) -> dict[str, Any]:
    """One rounds.csv row; `cum_uplink_bits` is the run's total including this round."""
    return {
        "round": outcome.round,
        "accuracy": _fmt(accuracy),
        "loss": _fmt(loss),
        "selected": len(outcome.fresh),
        "skipped": len(outcome.skipped),
        "failed": len(outcome.failed),
        "uplink_bits": outcome.uplink_bits,
        "downlink_bits": outcome.downlink_bits,
        "wire_bytes": outcome.wire_bytes,
        "seconds": f"{outcome.seconds:.4f}",
        "denied": len(outcome.denied),
        "fresh": ";".join(outcome.fresh),
        "participants": len(outcome.participants),
        "train_loss": _fmt(outcome.train_loss),
        "lazy_scalar": f"{outcome.lazy_scalar:.6g}",
        "cum_uplink_bits": cum_uplink_bits,
        "weights_source": outcome.weights_source,
        "failures": ";".join(f"{w}:{why}" for w, why in sorted(outcome.failed.items())),
        "weights_used": compact_weights(outcome.weights),
        "llm_confidence": _fmt(outcome.llm_confidence),
        "llm_reasoning": one_line(outcome.llm_reasoning),
        "rejected": ";".join(
            f"{w}:{why}" for w, why in sorted({**outcome.rejected, **outcome.refused}.items())
        ),
        "fusion": outcome.fusion.status,
        "fusion_loss": _fmt(outcome.fusion.loss) if outcome.fusion.status else "",
        "fusion_seconds": f"{outcome.fusion.seconds:.4f}" if outcome.fusion.status else "",
        **_training_times(outcome.train_seconds),
    }


def _training_times(seconds: Mapping[str, float]) -> dict[str, str]:
    """The round's median and slowest local training time (from the offers), and who."""
    if not seconds:
        return {"train_s_median": "nan", "train_s_max": "nan", "slowest": ""}
    slowest = max(sorted(seconds), key=lambda w: seconds[w])
    return {
        "train_s_median": f"{statistics.median(seconds.values()):.4f}",
        "train_s_max": f"{seconds[slowest]:.4f}",
        "slowest": slowest,
    }


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6f}"


def compact_weights(weights: Mapping[str, float]) -> str:
    """ "w0:0.31;w1:0.69": a results cell."""
    return ";".join(f"{w}:{weight:.4g}" for w, weight in sorted(weights.items()))


def one_line(text: Any, limit: int = REASONING_CHARS) -> str:
    """Text squeezed to one line of at most `limit` characters (for CSV cells and status)."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class ResultsWriter:
    def __init__(self, directory: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.directory / ROUNDS_CSV
        keep = resume and self.csv_path.exists()
        self._handle = self.csv_path.open("a" if keep else "w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS, extrasaction="raise")
        if not keep:
            self._writer.writeheader()
            self._flush()

    def write(self, row: Mapping[str, Any]) -> None:
        missing = set(FIXED_COLUMNS) - set(row)
        if missing:
            raise ValueError(f"results row misses columns {sorted(missing)}")
        self._writer.writerow({c: row.get(c, "") for c in COLUMNS})
        self._flush()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
            self._write_xlsx()

    def _flush(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def _write_xlsx(self) -> None:
        try:
            from openpyxl import Workbook  # optional: the original system wrote xlsx
        except ImportError:
            return
        book = Workbook()
        sheet = book.active
        sheet.title = "rounds"
        with self.csv_path.open(newline="") as handle:
            for i, row in enumerate(csv.reader(handle)):
                sheet.append(row if i == 0 else [_number(v) for v in row])
        book.save(self.directory / "rounds.xlsx")


def _number(value: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def read_rounds(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def reconcile_rounds(
    path: str | os.PathLike[str], next_round: int, checkpoint_row: Mapping[str, str] | None
) -> None:
    """Make rounds.csv agree with a checkpoint taken after round `next_round - 1`, before a
    resumed run appends to it: rows of later rounds (written after that checkpoint, for rounds
    the resumed run does again) and a line cut by a kill go; the checkpoint's own row, which it
    carries, comes back if the kill fell between the checkpoint and the row. Then every round
    is in the file once. Rewritten atomically, only when something changes."""
    target = Path(path)
    rows = read_rounds(target) if target.exists() else []
    kept = [r for r in rows if (_round_of(r) or next_round) < next_round]  # None: cut short
    restored = None
    if checkpoint_row is not None and _round_of(checkpoint_row) not in {_round_of(r) for r in kept}:
        restored = dict(checkpoint_row)
        kept.append(restored)
    if restored is None and len(kept) == len(rows):
        return
    _rewrite(target, kept)
    log.warning(
        "rounds.csv reconciled with the checkpoint",
        path=str(target),
        dropped=[r.get("round") for r in rows if r not in kept],
        restored=None if restored is None else restored.get("round"),
    )


def _round_of(row: Mapping[str, Any]) -> int | None:
    if None in row.values() or None in row:  # a line cut short (or run on) by a kill
        return None
    try:
        return int(row["round"])
    except (KeyError, TypeError, ValueError):
        return None


def _rewrite(target: Path, rows: list[dict[str, str]]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)

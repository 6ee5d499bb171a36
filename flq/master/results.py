"""Per-round results: rounds.csv (appended and fsynced each round), xlsx when openpyxl exists.

The first columns are fixed (tools and the original FLQ spreadsheets read them by position):
round, accuracy, loss, selected, skipped, failed, uplink_bits, downlink_bits, wire_bytes, seconds.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("flq.master.results")

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
)
COLUMNS = FIXED_COLUMNS + EXTRA_COLUMNS


class ResultsWriter:
    def __init__(self, directory: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.directory / "rounds.csv"
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

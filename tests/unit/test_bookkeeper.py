"""The bookkeeper's checkpoints and rounds.csv: written off the event loop, every N rounds, and
kept consistent with each other whatever moment a kill picks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from flq.config import default_config, with_overrides
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flq.master.federation import Federation, build_federation
from flq.master.outcome import RoundOutcome
from flq.master.results import COLUMNS, read_rounds, reconcile_rounds


class _Model:
    """A one-tensor model of `size` parameters that evaluates to a fixed score."""

    def __init__(self, size: int) -> None:
        self.initial_weights = [np.zeros(size, np.float32)]
        self.parameters = size

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        return 1.0, 0.5


def federation(size: int = 8, **overrides: object) -> Federation:
    cfg = with_overrides(default_config(), {"system.eval_every": 1, **overrides})
    return build_federation(cfg, _Model(size))


async def finish(books: RoundBookkeeper, round_id: int) -> None:
    books.federation.state.round = round_id + 1  # as the engine leaves it after a round
    await books.finish_round(RoundOutcome(round=round_id))


def test_the_loop_runs_while_the_checkpoint_is_written(tmp_path: Path) -> None:
    """A task on the loop sees the checkpoint's temporary file, which exists only while the
    write runs: it could not if the write (and its fsync) held the loop."""
    books = RoundBookkeeper(federation(size=8_000_000), tmp_path)

    async def scenario() -> bool:
        async def watch() -> bool:
            while not any(tmp_path.glob(".checkpoint.npz.*.tmp")):
                await asyncio.sleep(0.001)
            return True

        watcher = asyncio.create_task(watch())
        await finish(books, 1)
        await asyncio.sleep(0)
        seen = watcher.done()
        watcher.cancel()
        return seen

    try:
        assert asyncio.run(scenario())
    finally:
        books.close()
    assert int(load_checkpoint(tmp_path / "checkpoint.npz")["last_row"]["round"]) == 1


def test_checkpoint_every_writes_every_nth_round_with_its_row(tmp_path: Path) -> None:
    books = RoundBookkeeper(federation(), tmp_path, checkpoint_every=3)
    path = tmp_path / "checkpoint.npz"

    async def scenario() -> list[str | None]:
        written = []
        for round_id in range(1, 6):
            await finish(books, round_id)
            written.append(load_checkpoint(path)["last_row"]["round"] if path.exists() else None)
        return written

    try:
        assert asyncio.run(scenario()) == [None, None, "3", "3", "3"]
    finally:
        books.close()
    assert [r["round"] for r in read_rounds(tmp_path / "rounds.csv")] == ["1", "2", "3", "4", "5"]


def _csv(path: Path, rounds: list[int], tail: str = "") -> None:
    lines = [",".join(COLUMNS)] + [",".join([str(r)] + ["0"] * (len(COLUMNS) - 1)) for r in rounds]
    path.write_text("\n".join(lines) + "\n" + tail)


def _row(round_id: int) -> dict[str, str]:
    return {column: "0" for column in COLUMNS} | {"round": str(round_id), "accuracy": "0.5"}


@pytest.mark.parametrize(
    ("written", "tail", "next_round", "expected"),
    [
        ([1, 2], "", 4, ["1", "2", "3"]),  # killed after checkpoint 3, before its row
        ([1, 2, 3, 4, 5], "", 4, ["1", "2", "3"]),  # rows after checkpoint 3 are redone
        ([1, 2, 3], "4,0.1", 4, ["1", "2", "3"]),  # a row cut by the kill
        ([1, 2, 3], "", 4, ["1", "2", "3"]),  # nothing to do
    ],
    ids=["row-lost", "rows-ahead", "cut-line", "consistent"],
)
def test_rounds_csv_is_reconciled_with_the_checkpoint(
    tmp_path: Path, written: list[int], tail: str, next_round: int, expected: list[str]
) -> None:
    path = tmp_path / "rounds.csv"
    _csv(path, written, tail)
    reconcile_rounds(path, next_round, _row(next_round - 1))
    rows = read_rounds(path)
    assert [r["round"] for r in rows] == expected
    assert rows[-1]["accuracy"] == ("0.5" if written == [1, 2] else "0")


def test_a_checkpoint_of_another_model_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    first = RoundBookkeeper(federation(size=8), tmp_path)
    first.save()
    first.close()
    with pytest.raises(CheckpointError, match=r"checkpoint.npz: cannot resume from it: .*shape"):
        RoundBookkeeper(federation(size=9), tmp_path, resume=True)
    save_checkpoint(path, {"nothing": 1})
    with pytest.raises(CheckpointError, match=r"checkpoint.npz: cannot resume from it"):
        RoundBookkeeper(federation(size=8), tmp_path, resume=True)

"""The soak's invariant checks (tests/soak/invariants.py) catch each broken promise, and name the
fault in whose window it broke: rows of rounds.csv and a checkpoint as the master writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flq.master.checkpoint import save_checkpoint
from tests.soak.invariants import Watcher

HONEST = ["w0", "w1"]


def _row(round_id: int, **cells: str) -> dict[str, str]:
    row = {
        "round": str(round_id),
        "loss": "1.0",
        "fresh": "w0;w1",
        "failures": "",
        "rejected": "",
        "weights_used": "w0:0.5;w1:0.5",
        "seconds": "0.1",
    }
    return {**row, **cells}


def _watcher(tmp_path: Path) -> Watcher:
    watcher = Watcher(tmp_path, HONEST, loss_bound=10.0, deadline_s=2.0, fault="flood#1")
    watcher.connected = set(HONEST)
    return watcher


def _invariants(watcher: Watcher) -> list[str]:
    return [v.invariant for v in watcher.violations]


def test_clean_rounds_break_nothing(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path)
    watcher.check_rows([_row(1), _row(2), _row(3, fresh="w0", weights_used="w0:1")])
    assert watcher.violations == []
    assert watcher.counts.honest_aggregated == 5


def test_a_missing_or_repeated_round_is_named(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path)
    watcher.check_rows([_row(1), _row(3), _row(3)])
    assert [v.detail for v in watcher.violations] == [
        "round 3 follows round 1 (missing rounds)",
        "round 3 follows round 3 (repeated)",
    ]
    assert {v.fault for v in watcher.violations} == {"flood#1"}


def test_a_spoiled_model_and_a_refused_contribution_are_caught(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path)
    watcher.adversaries.add("huge-1")
    watcher.check_rows(
        [
            _row(1, loss="inf"),
            _row(2, loss="50"),
            _row(3, weights_used="w0:0.4;w1:0.4;huge-1:0.2"),
            _row(4, fresh="w0;w1;x", rejected="x:update norm too large"),
        ]
    )
    assert _invariants(watcher) == [
        "the global model stays finite and unspoiled",
        "the global model stays finite and unspoiled",
        "no refused message reaches the model",
        "no refused message reaches the model",
    ]


def test_honest_failures_count_unless_a_fault_hit_that_worker(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path)
    watcher.disturb("w1")
    watcher.check_rows(
        [
            _row(1, fresh="", failures="w0:deadline;w1:deadline", seconds="2.9"),
            _row(2, fresh="w0", failures="w1:reference mismatch: upload against version 3"),
            _row(3, fresh="w1", rejected="w0:update norm 1e+38 > 10 x median 1"),
        ]
    )
    assert [(v.invariant, v.detail) for v in watcher.violations] == [
        (
            "a responsive honest worker's round is aggregated",
            "round 1: w0 failed: deadline (the round took 2.90 s against its 2 s deadline)",
        ),
        ("no honest worker is rejected", "round 3: w0: update norm 1e+38 > 10 x median 1"),
    ]
    assert watcher.recovering() == ["w1"], "not back until undone and uploading"
    watcher.undo("w1", rows_written=4)  # row 4 is in the file, not checked yet
    rows = [_row(1), _row(2), _row(3), _row(4), _row(5, fresh="w0"), _row(6)]
    watcher.check_rows(rows[:5])
    assert watcher.recovering() == ["w1"], "a row written before the undo does not count"
    watcher.check_rows(rows)
    assert watcher.recovering() == []


def test_an_untouched_worker_that_disagrees_or_is_gone_is_a_violation(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path)
    watcher.connected = {"w0"}
    watcher.check_rows(
        [_row(1, fresh="w0", failures="w0:reference mismatch: upload against version 3")]
    )
    assert set(_invariants(watcher)) == {
        "master and worker references agree (or were explicitly reset)",
        "a responsive honest worker's round is aggregated",
        "every live honest worker takes part",
    }


def test_the_checkpoint_must_stay_finite_and_free_of_refused_contributions(
    tmp_path: Path,
) -> None:
    watcher = _watcher(tmp_path)
    watcher.adversaries.add("huge-1")
    store = {"ids": ["huge-1", "w0"], "has_contribution": [True, True]}
    weights = [np.array([1.0, np.inf], np.float32)]
    save_checkpoint(
        tmp_path / "checkpoint.npz", {"master": {"round": 2, "weights": weights, "store": store}}
    )
    watcher.check_rows([_row(1)])
    assert [v.detail for v in watcher.violations] == [
        "checkpoint of round 1 holds non-finite weights",
        "checkpoint of round 1 stores contributions of ['huge-1']",
    ]

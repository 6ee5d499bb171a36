"""The fault soak (tests/soak): real daemons on 127.0.0.1 under a seeded fault injector, with the
invariants checked after every round. `make bench-soak` runs the long version."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak.injector import FAULT_CLASSES, SoakSettings, run_soak

pytestmark = pytest.mark.slow

SURVIVED = FAULT_CLASSES  # every fault class issue 10 names


def test_fault_soak_keeps_every_invariant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_soak(tmp_path, SoakSettings(seed=10, duration_s=40.0, faults=SURVIVED))
    with capsys.disabled():
        print("\n" + report.summary())
    assert not report.violations, report.summary()
    assert set(report.injected) == set(SURVIVED), "every enabled fault class was injected"
    assert report.rounds >= 50
    assert report.honest_aggregated == report.honest_possible > 0


def test_a_master_kill_between_checkpoint_and_row_keeps_every_invariant(tmp_path: Path) -> None:
    """One master kill aimed between its two files, where it once lost the round's row for good
    (issue 10 #6): on --resume rounds.csv gets it back from the checkpoint."""
    settings = SoakSettings(seed=11, duration_s=1.0, faults=("master_kill",), aimed_master_kill=1.0)
    report = run_soak(tmp_path, settings)
    assert report.injected == {"master_kill": 1}
    assert not report.violations, report.summary()

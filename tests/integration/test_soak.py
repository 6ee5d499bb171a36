"""The fault soak (tests/soak): real daemons on 127.0.0.1 under a seeded fault injector, with the
invariants checked after every round. `make bench-soak` runs the long version."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak.injector import FAULT_CLASSES, SoakSettings, run_soak

pytestmark = pytest.mark.slow

# Fault classes main does not survive yet, each with the defect (issue 10) that breaks it and who
# is fixing it. A class leaves this table, and joins the soak, when its fix lands.
STILL_BREAKS = {
    "master_kill": "issue 10 #6: a kill between the checkpoint and the rounds.csv row loses the "
    "row for good (relproc)",
}
SURVIVED = tuple(f for f in FAULT_CLASSES if f not in STILL_BREAKS)


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


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=why))
        for f, why in STILL_BREAKS.items()
    ],
)
def test_fault_class_not_yet_survived(tmp_path: Path, fault: str) -> None:
    # One injection; a master kill aimed between its two files, where it breaks every time.
    settings = SoakSettings(seed=11, duration_s=1.0, faults=(fault,), aimed_master_kill=1.0)
    report = run_soak(tmp_path, settings)
    assert report.injected == {fault: 1}
    assert not report.violations, report.summary()

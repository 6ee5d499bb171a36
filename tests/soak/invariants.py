"""What must hold after every round of the soak, checked from what an operator can see: rounds.csv,
checkpoint.npz, the master's Status RPC and the processes themselves.

Every violation names the fault in whose window it appeared, so a failing soak says which fault
broke which promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flq.master.checkpoint import load_checkpoint
from flq.types import StatusReply

STARVED = 1.25  # a round this many times its deadline long: the master itself was stalled


@dataclass(frozen=True)
class Violation:
    fault: str  # the fault window it appeared in, e.g. "worker_stop#3(w1)"
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.fault}] {self.invariant}: {self.detail}"


@dataclass
class _Disturbance:
    """An honest worker hit by a fault: excused until it is back and answering in time."""

    fault: str
    undone_at_row: int | None = None  # rows.csv's length when the fault was undone


def parse_failures(cell: str) -> dict[str, str]:
    """rounds.csv's failures column, "w1:deadline;w2:rejected: ..." -> {worker: why}."""
    failures = {}
    for item in filter(None, cell.split(";")):
        worker, _, why = item.partition(":")
        failures[worker] = why
    return failures


@dataclass
class Counts:
    rounds: int = 0
    honest_aggregated: int = 0  # honest uploads that reached the model
    honest_lost_responsive: int = 0  # failures of honest workers no fault excused
    honest_lost_to_own_fault: int = 0  # failures of a worker while it was killed/frozen


@dataclass
class Watcher:
    """Checks each new rounds.csv row against the invariants."""

    run_dir: Path
    honest: list[str]
    loss_bound: float  # a loss above this means something spoiled the model
    deadline_s: float = math.inf  # the round deadline: a round far past it was starved
    fault: str = "start-up"
    adversaries: set[str] = field(default_factory=set)
    disturbed: dict[str, _Disturbance] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    last_round: int = 0
    # Workers the master had a link to at the last Status (None: the master did not answer).
    connected: set[str] | None = None

    def violate(self, invariant: str, detail: str) -> None:
        violation = Violation(self.fault, invariant, detail)
        if violation not in self.violations:
            self.violations.append(violation)

    # ------------------------------------------------------------ fault windows

    def excuse_start_up(self) -> None:
        """Workers are still starting: each is excused until it is first back."""
        for worker in self.honest:
            self.disturb(worker)
            self.undo(worker, rows_written=0)

    def disturb(self, worker_id: str) -> None:
        self.disturbed[worker_id] = _Disturbance(self.fault)

    def undo(self, worker_id: str, rows_written: int) -> None:
        """The fault is over; only rows after the `rows_written` already in rounds.csv (then
        written by the restarted or thawed process) can show the worker back."""
        if worker_id in self.disturbed:
            self.disturbed[worker_id].undone_at_row = rows_written

    def recovering(self) -> list[str]:
        return sorted(self.disturbed)

    # ------------------------------------------------------------ per round

    def observe_status(self, status: StatusReply | None) -> None:
        self.connected = (
            None if status is None else {w.worker_id for w in status.workers if w.connected}
        )

    def check_rows(self, rows: list[dict[str, str]]) -> None:
        """Check the rows not seen yet (rounds.csv only grows), then the checkpoint."""
        new = rows[self.counts.rounds :]
        for row in new:
            self._check_row(row)
        if new:
            self._check_checkpoint()

    def _check_row(self, row: dict[str, str]) -> None:
        round_id = int(row["round"])
        index = self.counts.rounds
        self.counts.rounds += 1
        if round_id != self.last_round + 1:
            what = "repeated" if round_id <= self.last_round else "missing rounds"
            self.violate(
                "rounds.csv has every round once",
                f"round {round_id} follows round {self.last_round} ({what})",
            )
        self.last_round = max(self.last_round, round_id)
        loss = float(row["loss"])
        if not math.isfinite(loss) or loss > self.loss_bound:
            self.violate(
                "the global model stays finite and unspoiled",
                f"round {round_id}: test loss {loss:g} (bound {self.loss_bound:g})",
            )
        fresh = set(filter(None, row["fresh"].split(";")))
        failures = parse_failures(row["failures"])
        refused = parse_failures(row.get("rejected") or "")
        self._check_honest(round_id, index, fresh, failures, refused, self._stall_note(row))
        weighed = set(parse_failures(row["weights_used"]))
        spoiled = ((fresh | weighed) & self.adversaries) | (fresh & set(refused))
        if spoiled:
            self.violate(
                "no refused message reaches the model",
                f"round {round_id}: contributions of {sorted(spoiled)} were aggregated",
            )

    def _stall_note(self, row: dict[str, str]) -> str:
        """The engine ends a round at its deadline; one that took far longer ran on a master
        that did not get the CPU. Say so beside what failed in it."""
        seconds = float(row["seconds"])
        if seconds <= STARVED * self.deadline_s:
            return ""
        return f" (the round took {seconds:.2f} s against its {self.deadline_s:g} s deadline)"

    def _check_honest(
        self,
        round_id: int,
        index: int,
        fresh: set[str],
        failures: dict[str, str],
        refused: dict[str, str],
        note: str,
    ) -> None:
        for worker in self.honest:
            self.counts.honest_aggregated += worker in fresh
            why = failures.get(worker)
            if worker in refused or (why is not None and "rejected" in why):
                detail = refused.get(worker) or why
                self.violate(
                    "no honest worker is rejected", f"round {round_id}: {worker}: {detail}"
                )
            watch = self.disturbed.get(worker)
            if watch is None and why is not None and "reference" in why:
                # After its own fault a worker may hold a reference the master reset: that
                # ends in an explicit reset. A worker no fault touched must never disagree.
                self.violate(
                    "master and worker references agree (or were explicitly reset)",
                    f"round {round_id}: {worker}: {why}",
                )
            if watch is not None:
                self.counts.honest_lost_to_own_fault += why is not None
                self._advance_recovery(worker, watch, index, fresh)
                continue
            if why is not None:
                self.counts.honest_lost_responsive += 1
                self.violate(
                    "a responsive honest worker's round is aggregated",
                    f"round {round_id}: {worker} failed: {why}{note}",
                )
            elif self.connected is not None and worker not in self.connected:
                self.violate(
                    "every live honest worker takes part",
                    f"round {round_id}: {worker} is not connected",
                )

    def _advance_recovery(
        self, worker: str, watch: _Disturbance, index: int, fresh: set[str]
    ) -> None:
        """Back once an upload of it reached the model in a round after the fault was undone
        (the soak's lazy rule forces one every few rounds)."""
        undone = watch.undone_at_row
        if undone is not None and index >= undone and worker in fresh:
            del self.disturbed[worker]

    def _check_checkpoint(self) -> None:
        path = self.run_dir / "checkpoint.npz"
        if not path.exists():
            return
        try:
            saved = load_checkpoint(path)
        except Exception as error:  # a checkpoint the master cannot resume from is a violation
            self.violate("the checkpoint is readable", f"{type(error).__name__}: {error}")
            return
        master = saved["master"]
        if not all(np.isfinite(w).all() for w in master["weights"]):
            self.violate(
                "the global model stays finite and unspoiled",
                f"checkpoint of round {int(master['round']) - 1} holds non-finite weights",
            )
        store = master["store"]
        holders = {
            str(w) for w, has in zip(store["ids"], store["has_contribution"], strict=True) if has
        }
        spoiled = holders & self.adversaries
        if spoiled:
            self.violate(
                "no refused message reaches the model",
                f"checkpoint of round {int(master['round']) - 1} stores contributions of "
                f"{sorted(spoiled)}",
            )

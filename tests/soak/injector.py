"""The fault soak: a federation of real daemons, a seeded injector, invariants after every round.

The injector takes one fault at a time, in a random order reshuffled each cycle (so every enabled
class comes up), undoes it, and waits until every worker it hit is back before the next one. A
watcher reads rounds.csv, the checkpoint and the master's Status ten times a second and checks
each new round (tests/soak/invariants.py).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from flq.config import load_config
from flq.master.checkpoint import load_checkpoint
from flq.synthetic import SyntheticEvaluation, problem_for
from tests.processes import complete_rounds
from tests.soak.adversary import AdversaryResult, misbehave
from tests.soak.fleet import Fleet, FleetSettings
from tests.soak.invariants import Watcher

PROCESS_FAULTS = ("worker_kill", "worker_stop", "master_kill")
CLIENT_FAULTS = ("silent", "flood", "huge", "wrong_codec", "garbage")
FAULT_CLASSES = PROCESS_FAULTS + CLIENT_FAULTS
POLL_S = 0.1
SHOWN_VIOLATIONS = 25
AIM_ATTEMPTS = 30  # rounds an aimed master kill may watch before it kills anyway


@dataclass(frozen=True)
class SoakSettings:
    seed: int = 0
    duration_s: float = 60.0  # injection time (start-up not counted)
    max_rounds: int = 0  # stop injecting after this round too (0: duration only)
    faults: tuple[str, ...] = FAULT_CLASSES
    fleet: FleetSettings = field(default_factory=FleetSettings)
    recovery_s: float = 25.0  # how long a worker hit by a fault may take to be back
    stall_s: float = 30.0  # no new round for this long (master running) = the federation stalled


@dataclass
class SoakReport:
    settings: SoakSettings
    seconds: float = 0.0
    injected: dict[str, int] = field(default_factory=dict)  # fault class -> times
    rounds: int = 0
    honest_aggregated: int = 0
    honest_possible: int = 0
    honest_lost_to_own_fault: int = 0
    adversaries: list[AdversaryResult] = field(default_factory=list)
    kills_between_files: int = 0  # master kills that landed between checkpoint and row
    master_resets: int = 0
    worker_resets: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        faults = ", ".join(f"{name} {n}" for name, n in sorted(self.injected.items()))
        bad = sum(r.bad_uploads for r in self.adversaries)
        lines = [
            f"soak seed {self.settings.seed}: {self.seconds:.1f} s, {self.rounds} rounds, "
            f"{sum(self.injected.values())} faults injected ({faults})",
            f"honest uploads aggregated / possible: {self.honest_aggregated}/"
            f"{self.honest_possible} (failures while their own worker was down or frozen: "
            f"{self.honest_lost_to_own_fault})",
            f"adversary sessions {len(self.adversaries)}, bad uploads sent after a grant {bad}; "
            f"master kills between its checkpoint and its rounds.csv row "
            f"{self.kills_between_files}; explicit reference resets: master "
            f"{self.master_resets}, workers {self.worker_resets}",
            f"violations: {len(self.violations)}",
            *(f"  {v}" for v in self.violations[:SHOWN_VIOLATIONS]),
        ]
        if len(self.violations) > SHOWN_VIOLATIONS:
            lines.append(f"  ... and {len(self.violations) - SHOWN_VIOLATIONS} more")
        return "\n".join(lines)


class Soak:
    def __init__(self, directory: Path, settings: SoakSettings) -> None:
        unknown = set(settings.faults) - set(FAULT_CLASSES)
        if unknown or not settings.faults:
            raise ValueError(f"fault classes {sorted(unknown)}: choose from {FAULT_CLASSES}")
        self.settings = settings
        self.fleet = Fleet(directory, settings.fleet)
        self.rng = random.Random(settings.seed)
        cfg = load_config(self.fleet.config)
        evaluation = SyntheticEvaluation(problem_for(cfg))
        initial_loss, _ = evaluation.evaluate(evaluation.initial_weights)
        # Twice the untrained model's loss: training only lowers it; a spoiled model blows it up.
        self.watcher = Watcher(
            self.fleet.run_dir,
            self.fleet.honest,
            loss_bound=2.0 * initial_loss,
            deadline_s=settings.fleet.round_timeout_s,
        )
        self.report = SoakReport(settings)
        self.down: set[str] = set()  # processes the injector took down on purpose
        self.fatal = asyncio.Event()
        self._adversary_ids = itertools.count(1)
        self._last_progress = time.monotonic()
        self._watcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the run

    async def run(self) -> SoakReport:
        started = time.monotonic()
        self.fleet.start()
        self.watcher.excuse_start_up()
        watcher = self._watcher = asyncio.create_task(self._watch())
        try:
            await self._first_rounds()
            await self._inject_until(time.monotonic() + self.settings.duration_s)
        finally:
            watcher.cancel()
            (ended,) = await asyncio.gather(watcher, return_exceptions=True)
            self.fleet.close()
        if isinstance(ended, Exception):
            raise RuntimeError("the soak's watcher failed: no round was checked after") from ended
        self.report.seconds = time.monotonic() - started
        self._fill_report()
        return self.report

    async def _first_rounds(self) -> None:
        """Until every honest worker has uploaded once: a fault on a worker still starting
        would test nothing."""
        deadline = time.monotonic() + 60
        while self.watcher.recovering() and not self.fatal.is_set() and not self._watcher_failed():
            if time.monotonic() > deadline:
                waiting = ", ".join(self.watcher.recovering())
                self.watcher.violate("the federation starts", f"no upload of {waiting} in 60 s")
                self.fatal.set()
            await asyncio.sleep(POLL_S)

    async def _inject_until(self, end: float) -> None:
        numbers = itertools.count(1)
        while not self._done(end):
            order = list(self.settings.faults)
            self.rng.shuffle(order)
            for fault in order:
                if self._done(end):
                    return
                label = f"{fault}#{next(numbers)}"
                self.watcher.fault = label
                self.report.injected[fault] = self.report.injected.get(fault, 0) + 1
                await FAULTS[fault](self)
                await self._settle()
                self.watcher.fault = f"after {label}"
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    def _done(self, end: float) -> bool:
        rounds = self.settings.max_rounds
        return (
            self.fatal.is_set()
            or self._watcher_failed()
            or time.monotonic() >= end
            or (rounds > 0 and self.watcher.last_round >= rounds)
        )

    def _watcher_failed(self) -> bool:
        """The watcher ended while it should run: nothing would check the rounds any more."""
        return self._watcher is not None and self._watcher.done()

    async def _settle(self) -> None:
        """Wait until every worker the fault hit is back; past recovery_s that is a violation."""
        deadline = time.monotonic() + self.settings.recovery_s
        while self.watcher.recovering() and not self.fatal.is_set() and not self._watcher_failed():
            if time.monotonic() > deadline:
                for worker in self.watcher.recovering():
                    self.watcher.violate(
                        f"a worker hit by a fault is back within {self.settings.recovery_s:g} s",
                        f"{worker} is not",
                    )
                    del self.watcher.disturbed[worker]
                return
            await asyncio.sleep(POLL_S)

    async def _watch(self) -> None:
        while True:
            self.watcher.observe_status(await self.fleet.status())
            rows = complete_rounds(self.fleet.run_dir)
            if len(rows) > self.watcher.counts.rounds:
                self._last_progress = time.monotonic()
            try:
                self.watcher.check_rows(rows)
            except (KeyError, ValueError) as error:
                self.watcher.violate("rounds.csv rows are well-formed", repr(error))
                self.fatal.set()
            self._check_processes()
            await asyncio.sleep(POLL_S)

    def _check_processes(self) -> None:
        for name, code in self.fleet.exited().items():
            if name not in self.down:
                self.watcher.violate("no daemon dies", f"{name} exited with code {code}")
                self.fatal.set()
        if "master" not in self.down and time.monotonic() - self._last_progress > (
            self.settings.stall_s
        ):
            self.watcher.violate(
                "the federation keeps making rounds",
                f"no round for {self.settings.stall_s:g} s after round {self.watcher.last_round}",
            )
            self.fatal.set()

    def _fill_report(self) -> None:
        counts = self.watcher.counts
        report = self.report
        report.rounds = counts.rounds
        report.honest_aggregated = counts.honest_aggregated
        report.honest_possible = counts.honest_aggregated + counts.honest_lost_responsive
        report.honest_lost_to_own_fault = counts.honest_lost_to_own_fault
        report.violations = [str(v) for v in self.watcher.violations]
        report.master_resets = _count_lines(
            self.fleet.master_log, ("reference mismatch: resetting", "reference reset")
        )
        report.worker_resets = sum(
            _count_lines(self.fleet.worker_log(w), ("upload reference reset",))
            for w in self.fleet.honest
        )

    # ------------------------------------------------------------ faults

    def _hold_s(self) -> float:
        """Past the round deadline: long enough that waiting for the culprit would cost a round."""
        return self.settings.fleet.round_timeout_s + self.rng.uniform(0.3, 1.2)

    async def worker_kill(self) -> None:
        worker = self.rng.choice(self.fleet.honest)
        self.watcher.disturb(worker)
        self.down.add(worker)
        self.fleet.signal_worker(worker, signal.SIGKILL)
        await asyncio.sleep(self.rng.uniform(0.2, 1.5))
        self.fleet.start_worker(worker)
        self.down.discard(worker)
        self._undo(worker)

    async def worker_stop(self) -> None:
        worker = self.rng.choice(self.fleet.honest)
        self.watcher.disturb(worker)
        self.fleet.signal_worker(worker, signal.SIGSTOP)
        await asyncio.sleep(self._hold_s())
        self.fleet.signal_worker(worker, signal.SIGCONT)
        self._undo(worker)

    async def master_kill(self) -> None:
        for worker in self.fleet.honest:
            self.watcher.disturb(worker)
        if self.report.injected["master_kill"] % 2 == 1:  # the first, third, ... kill aims
            self.report.kills_between_files += await self._between_checkpoint_and_row()
        else:
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))  # anywhere in a round
        self.down.add("master")
        self.fleet.signal_master(signal.SIGKILL)
        self.fleet.start_master(resume=True)
        self.down.discard("master")
        self._last_progress = time.monotonic()
        await self._master_answers()
        for worker in self.fleet.honest:
            self._undo(worker)

    async def _between_checkpoint_and_row(self) -> bool:
        """Freeze the master the moment its checkpoint or rounds.csv changes; return (to be
        killed) if the other one has not caught up, else let it run to the next round. The
        power cut that lands between the two writes, found in a few rounds instead of luck."""
        files = [self.fleet.run_dir / "checkpoint.npz", self.fleet.run_dir / "rounds.csv"]
        before = _stamps(files)
        for _ in range(AIM_ATTEMPTS):
            deadline = time.monotonic() + self.settings.stall_s
            while _stamps(files) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            self.fleet.signal_master(signal.SIGSTOP)
            if _checkpointed_round(files[0]) != _last_row(self.fleet.run_dir):
                return True
            before = _stamps(files)
            self.fleet.signal_master(signal.SIGCONT)
        return False

    def _undo(self, worker: str) -> None:
        self.watcher.undo(worker, rows_written=len(complete_rounds(self.fleet.run_dir)))

    async def _master_answers(self) -> None:
        """Until the restarted master serves Status (bounded by recovery_s)."""
        deadline = time.monotonic() + self.settings.recovery_s
        while await self.fleet.status() is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)

    async def client(self, behaviour: str) -> None:
        worker_id = f"{behaviour}-{next(self._adversary_ids)}"
        self.watcher.adversaries.add(worker_id)
        result = await misbehave(behaviour, self.fleet.address, worker_id, self._hold_s())
        self.report.adversaries.append(result)
        if behaviour == "garbage" and result.code != "INVALID_ARGUMENT":
            self.watcher.violate(
                "bytes that are not protobuf are refused with INVALID_ARGUMENT",
                f"{worker_id}: the call ended {result.code} {result.details!r}",
            )


def _client_fault(behaviour: str) -> Callable[[Soak], Awaitable[None]]:
    async def fault(soak: Soak) -> None:
        await soak.client(behaviour)

    return fault


FAULTS: dict[str, Callable[[Soak], Awaitable[None]]] = {
    "worker_kill": Soak.worker_kill,
    "worker_stop": Soak.worker_stop,
    "master_kill": Soak.master_kill,
    **{behaviour: _client_fault(behaviour) for behaviour in CLIENT_FAULTS},
}


def _stamps(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns if p.exists() else 0 for p in paths]


def _checkpointed_round(path: Path) -> int:
    """The last round the checkpoint holds (-1 while it is unreadable)."""
    try:
        return int(load_checkpoint(path)["master"]["round"]) - 1
    except Exception:
        return -1


def _last_row(run_dir: Path) -> int:
    rows = complete_rounds(run_dir)
    return int(rows[-1]["round"]) if rows else 0


def _count_lines(path: Path, needles: tuple[str, ...]) -> int:
    if not path.exists():
        return 0
    with path.open(errors="replace") as lines:
        return sum(any(n in line for n in needles) for line in lines)


def run_soak(directory: Path, settings: SoakSettings) -> SoakReport:
    return asyncio.run(Soak(directory, settings).run())

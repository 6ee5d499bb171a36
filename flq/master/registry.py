"""Who the workers are: identity, stats and current link, kept across reconnects.

A worker is known by its id. A second connection with a live id replaces the old session (the old
link is closed and the replacement is logged): a board that rebooted must not be locked out by its
own half-dead previous connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from flq.link import WorkerLink
from flq.master.outcome import RoundOutcome
from flq.types import DeviceInfo, Hello, Location

log = structlog.get_logger("flq.master.registry")
RECENT_LOSSES = 10


@dataclass(eq=False)  # a record is an identity: hashable, compared by object
class WorkerRecord:
    worker_id: str
    num_samples: int
    device: DeviceInfo
    location: Location
    link: WorkerLink | None = None
    last_seen: float = 0.0
    uplink_bits: int = 0
    uploads: int = 0
    skips: int = 0
    failures: int = 0
    last_upload_round: int = -1
    download_version: int = -1  # the downlink reference version this worker holds (-1: unknown)
    # The first downlink version this master process sent the worker: what it holds from there
    # on is this process's lineage, so a chain of missed deltas can bring it up to date.
    first_download_version: int = -1
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LOSSES))
    features: dict[str, float] = field(default_factory=dict)  # Hello.features (traffic, usage)

    @property
    def connected(self) -> bool:
        return self.link is not None

    def seen(self) -> None:
        self.last_seen = time.time()


class Registry:
    """Every worker the master has met, by id: its current link (None when disconnected), what
    its Hello said, and its running counters (changed only by `record_round`)."""

    def __init__(self) -> None:
        self._records: dict[str, WorkerRecord] = {}
        self._changed = asyncio.Event()

    def attach(self, hello: Hello, link: WorkerLink) -> tuple[WorkerRecord, WorkerLink | None]:
        """Register a session; returns the record and the link it replaced, if any."""
        record = self._records.get(hello.worker_id)
        if record is None:
            record = WorkerRecord(hello.worker_id, hello.num_samples, hello.device, hello.location)
            self._records[hello.worker_id] = record
        replaced = record.link
        record.link = link
        record.num_samples = hello.num_samples
        record.device = hello.device
        record.location = hello.location
        record.features = dict(hello.features)
        record.seen()
        self._notify()
        if replaced is not None:
            log.warning(
                "worker session replaced",
                worker=hello.worker_id,
                old_session=replaced.session_id,
                new_session=link.session_id,
            )
        return record, replaced

    def detach(self, link: WorkerLink) -> None:
        """Forget a link if it is still the current one (a replaced link detaching is a no-op)."""
        record = self._records.get(link.worker_id)
        if record is not None and record.link is link:
            record.link = None
            self._notify()

    def record_round(self, outcome: RoundOutcome) -> None:
        """Add one round to each worker's counters: the offered loss, uploads and their bits,
        skips (lazy or denied, told so) and failures. The one place these counters change."""
        for worker_id, loss in outcome.train_losses.items():
            self._counted(worker_id).recent_losses.append(loss)
        for worker_id, bits in outcome.upload_bits.items():
            record = self._counted(worker_id)
            record.uplink_bits += bits
            record.uploads += 1
            record.last_upload_round = outcome.round
        for worker_id in (*outcome.skipped, *outcome.denied):
            if worker_id not in outcome.failed:  # a worker its Decision never reached failed
                self._counted(worker_id).skips += 1
        for worker_id in outcome.failed:
            self._counted(worker_id).failures += 1

    def _counted(self, worker_id: str) -> WorkerRecord:
        record = self._records.get(worker_id)
        if record is None:
            raise KeyError(f"round outcome names worker {worker_id!r}, which never connected")
        return record

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._records.get(worker_id)

    def all(self) -> list[WorkerRecord]:
        return sorted(self._records.values(), key=lambda r: r.worker_id)

    def connected(self) -> list[WorkerRecord]:
        return [r for r in self.all() if r.link is not None]

    async def wait_for_workers(self, count: int, timeout: float | None) -> bool:
        """Wait until at least `count` workers are connected; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self.connected()) < count:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin before 3.11
                return False
        return True

    def _notify(self) -> None:
        self._changed.set()

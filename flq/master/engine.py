"""The round engine: one FLQ round over whatever transport the links use.

configure -> send the model -> collect offers -> select -> decide -> collect uploads -> aggregate ->
step. Every wait is bounded by the round deadline; a worker that misses it, drops its link or breaks
the protocol is a recorded failure of that round, never a stall. The math lives in flq.algorithm;
this module only sequences it and counts what crosses the wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from flq.algorithm import Offer, Selection, normalise, select_uploads, update_stats
from flq.codec import CodecError, EncodedTensor, Reassembler
from flq.link import LinkClosed, ProtocolViolation, ViolationCode, WorkerLink
from flq.master.advice import RunProgress, WeightAdvisor, advise_within, facts_for
from flq.master.fusion import FusionStep
from flq.master.handshake import check_hello, reconcile_references, welcome_for
from flq.master.outcome import RoundOutcome
from flq.master.prepared import PreparedRound
from flq.master.registry import Registry, WorkerRecord
from flq.master.state import MasterState, WeightDecision
from flq.types import (
    Decision,
    EvalResult,
    Heartbeat,
    MasterMessage,
    ModelIdentity,
    ResetReference,
    RoundConfig,
    Shutdown,
    Skip,
    UpdateChunk,
    UploadOffer,
    WorkerMessage,
)

log = structlog.get_logger("flq.master")
OFFER_SHARE = 0.8  # offers are taken for at most this share of the round; the rest is for uploads
RESET_SEND_S = 1.0  # how long a ResetReference may take to send before the round moves on
SILENT_ROUNDS = 2  # a worker not heard from in this many rounds in a row is not waited for

__all__ = ["EngineSettings", "RoundEngine", "RoundOutcome"]


@dataclass(frozen=True)
class EngineSettings:
    """What the engine needs from the config: what workers are told each round, the selection
    rule (top-k and bit budget) and the deadlines (flq.master.federation builds it)."""

    round_config: RoundConfig
    sel_clients: int = 0
    up_budget_bits: float = 0.0
    by_sample_share: bool = False  # rank offers by energy * (sample share)^2
    round_timeout_s: float = 60.0
    hello_timeout_s: float = 30.0
    offer_quorum: float = 0.5  # share of the round's workers whose offers make a quorum
    offer_grace_s: float = 2.0  # least wait for the rest once the quorum is in
    participation: float = 1.0  # share of the connected workers invited to each round
    seed: int = 0  # with the round, seeds who is invited
    max_rounds: int = 0  # the run's length, for the weight advisor's view of progress
    model: ModelIdentity | None = None  # the master's model; a Hello with another is refused
    lr_decay_every: int = 0  # rounds between steps of the client lr; 0 = constant
    lr_decay_factor: float = 0.5

    def round_config_for(self, round_id: int) -> RoundConfig:
        """What workers are told in round `round_id`: the run's RoundConfig, its lr stepped down
        by lr_decay_factor every lr_decay_every rounds (round 1 trains with the configured lr)."""
        if self.lr_decay_every <= 0:
            return self.round_config
        steps = (max(round_id, 1) - 1) // self.lr_decay_every
        lr = self.round_config.lr * self.lr_decay_factor**steps
        return dataclasses.replace(self.round_config, lr=lr)


class _Failure(Exception):
    """One worker's round ended badly; `reason` goes into the results."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _WorkerRound:
    """What one worker's task learnt in this round; only that task writes it."""

    record: WorkerRecord
    send_model: bool = True  # False for the long silent: nothing piles up in a frozen board
    heard: bool = False  # any message came from it this round (a late one, a heartbeat)
    offer: UploadOffer | None = None
    skipped: bool = False  # answered with Skip: present, but nothing to offer
    in_time: bool = False  # offered before the cut-off
    grant_sent: bool = False  # a grant may have reached it, so its reference may move
    upload: list[EncodedTensor] | None = None
    wire_bytes: int = 0
    downlink_bits: int = 0


@dataclass(eq=False)
class _OfferCutoff:
    """When the round stops waiting for offers: at the earliest of
    - every awaited worker has offered (or its task ended: it left, failed or broke the
      protocol); a worker silent for SILENT_ROUNDS rounds in a row is not awaited (it may still
      offer, and is awaited again once it has);
    - a quorum has offered and a grace period has passed since: max(grace_s, the time the
      quorum took), so stragglers get as long again as the quorum needed, and at least grace_s;
    - `latest` (OFFER_SHARE of the round's time), with whatever offers are in hand.
    Offers after the cut-off are answered "late"; `selection` is the round's one decision."""

    awaited: frozenset[WorkerRecord]
    quorum: int
    grace_s: float
    started: float
    latest: float
    offers: dict[WorkerRecord, UploadOffer] = field(default_factory=dict)
    ended: set[WorkerRecord] = field(default_factory=set)  # tasks over without an offer in time
    quorum_at: float | None = None
    closed: bool = False
    selection: asyncio.Future[Selection] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, record: WorkerRecord, offer: UploadOffer) -> bool:
        """Take an offer; False if it came after the cut-off."""
        if self.closed:
            return False
        self.offers[record] = offer
        if self.quorum_at is None and len(self.offers) >= self.quorum:
            self.quorum_at = asyncio.get_running_loop().time()
        self._changed.set()
        return True

    def watch(self, task: asyncio.Future[None], record: WorkerRecord) -> None:
        task.add_done_callback(lambda _: self.task_done(record))

    def task_done(self, record: WorkerRecord) -> None:
        """A worker's task ended; without an offer in hand there is nothing more to wait for."""
        if record not in self.offers:
            self.ended.add(record)
        self._changed.set()

    def _left(self, now: float) -> float:
        """Seconds until the cut-off (0: now)."""
        if self.awaited <= self.offers.keys() | self.ended or now >= self.latest:
            return 0.0
        if self.quorum_at is None:
            return self.latest - now
        grace = max(self.grace_s, self.quorum_at - self.started)
        return max(0.0, min(self.quorum_at + grace, self.latest) - now)

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = self._left(loop.time())
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def close(self, selection: Selection) -> None:
        self.closed = True
        self.selection.set_result(selection)


class RoundEngine:
    """Runs FLQ rounds over `WorkerLink`s: `accept` starts a worker's session, `run_round` runs
    one round with every connected worker. Transport-free: the daemon and the simulator drive
    the same engine (flq.master.driver), over gRPC and in-memory links respectively."""

    def __init__(
        self,
        state: MasterState,
        registry: Registry,
        settings: EngineSettings,
        advisor: WeightAdvisor | None = None,
        fusion: FusionStep | None = None,
    ) -> None:
        self.state = state
        self.registry = registry
        self.settings = settings
        self.advisor = advisor  # proposes each round's aggregation weights (llm, agreement)
        self.progress = RunProgress(settings.max_rounds)  # what the advisor hears of the run
        self.fusion = fusion  # fuses a teacher's knowledge into the model after the step
        self._silent: dict[str, int] = {}  # rounds in a row without an offer, by worker

    # ------------------------------------------------------------ sessions

    async def accept(self, link: WorkerLink) -> WorkerRecord:
        """Handshake on a new link: Hello in, registry and reference reconciliation, Welcome
        out (flq.master.handshake)."""
        try:
            first = await asyncio.wait_for(link.recv(), self.settings.hello_timeout_s)
        except asyncio.TimeoutError as error:
            raise ProtocolViolation(
                ViolationCode.DEADLINE_EXCEEDED, "no Hello within the hello timeout"
            ) from error
        hello = check_hello(first.message, link.worker_id, self.settings.model)
        record, replaced = self.registry.attach(hello, link)
        if replaced is not None:
            await _close_quietly(
                replaced, Shutdown(self.state.round, "replaced by a new session", reconnect=False)
            )
        reset = reconcile_references(hello, record, self.state)
        self._silent.pop(hello.worker_id, None)  # a new session is awaited from its first round
        await link.send(welcome_for(hello, link.session_id, self.state, reset))
        log.info(
            "worker connected",
            worker=hello.worker_id,
            session=link.session_id,
            samples=hello.num_samples,
            reset=reset,
            device=hello.device.accelerator,
        )
        return record

    # ------------------------------------------------------------ one round

    async def run_round(self) -> RoundOutcome:
        """One FLQ round, as DESIGN.md's "one round, end to end" states it:

        1. send every connected worker the global model (quantized against its reference);
        2. collect one offer per worker: wants to upload, at what cost in bits, with what energy;
        3. at the offer cut-off, select uploads under the top-k / bit-budget rule among the
           offers in hand and tell every worker its decision (a later offer is denied "late");
        4. collect the granted uploads; any grant whose upload is not applied (lost, refused,
           or dropped from a non-finite step) resets that worker's reference on both sides;
        5. store the uploads (screened), add the round to the registry's counters, ask the
           weight advisor (if any) and step the global model with every counting contribution;
        6. when a fusion is due, fuse the teacher's knowledge into the stepped model
           (flq.master.fusion: applied, or skipped with the reason; the next round sends it).

        Each worker moves through the round in its own task, so no worker waits on another's
        messages; the only shared moment is the cut-off (`_OfferCutoff`: every offer in, or a
        quorum in and a grace period over). A worker that is silent, leaves or breaks the
        protocol fails this round alone (`outcome.failed`); docs/architecture.md has the rule.
        """
        round_id = self.state.round
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.round_timeout_s
        connected = self.registry.connected()
        records = invited(connected, self.settings.participation, self.settings.seed, round_id)
        outcome = RoundOutcome(round=round_id, participants=[r.worker_id for r in records])
        prepared = PreparedRound(
            round_id,
            self.state.downlink.prepare(self.state.weights),
            self.settings.round_config_for(round_id),
            self.state.lazy_scalar,
        )
        # Not waiting for the long silent keeps a frozen board from costing every round a grace,
        # and not sending them the model keeps rounds from piling up in its buffers (it would
        # train through each when it wakes). Anything it says makes it awaited again next round.
        # With nobody else left, everyone is awaited (no round may spin through without waiting).
        awaited = [r for r in records if self._silent.get(r.worker_id, 0) < SILENT_ROUNDS]
        awaited = awaited or records
        cutoff = _OfferCutoff(
            awaited=frozenset(awaited),
            quorum=self._quorum(len(awaited)),
            grace_s=self.settings.offer_grace_s,
            started=loop.time(),
            latest=loop.time() + OFFER_SHARE * self.settings.round_timeout_s,
        )
        parts = [_WorkerRound(r, send_model=r in cutoff.awaited) for r in records]
        tasks = {
            asyncio.ensure_future(self._worker_round(p, prepared, round_id, cutoff)): p
            for p in parts
        }
        for task, part in tasks.items():
            cutoff.watch(task, part.record)
        try:
            await cutoff.wait()
            cutoff.close(self._select(cutoff.offers, outcome))
            in_round = [t for t, p in tasks.items() if p.in_time]
            if in_round:
                await asyncio.wait(in_round, timeout=max(0.0, deadline - loop.time()))
        finally:
            # Past the deadline, or the round itself cancelled (forced stop): no task outlives it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task, part in tasks.items():
            await self._settle(task, part, outcome)
        await self._reset(
            [p.record for p in parts if p.grant_sent and p.upload is None],
            "granted upload did not arrive",
            outcome,
        )
        self._apply(parts, outcome)
        self._note_presence(
            parts, sitting_out={r.worker_id for r in connected} - set(outcome.participants)
        )
        outcome.train_loss = _weighted_loss(cutoff.offers)
        self.progress.trained(outcome.train_loss)
        self.registry.record_round(outcome)
        decision = await self._advise(round_id, outcome)
        await self._step(outcome, decision)
        await self._fuse(round_id, outcome)
        outcome.seconds = time.perf_counter() - started
        self.state.round += 1
        return outcome

    def wait_for_every_offer(self) -> None:
        """Take no offer cut-off short of the deadline (quorum 1). For in-memory workers, which
        are never silent, only slow: a cut-off would make a simulation's results depend on how
        loaded its machine is (late offers denied), not on the algorithm."""
        self.settings = dataclasses.replace(self.settings, offer_quorum=1.0)

    def _quorum(self, workers: int) -> int:
        return max(1, math.ceil(self.settings.offer_quorum * workers)) if workers else 0

    async def _worker_round(
        self, part: _WorkerRound, prepared: PreparedRound, round_id: int, cutoff: _OfferCutoff
    ) -> None:
        """One worker's round, start to end, in its own task: model out, offer in, decision out,
        upload in. Everything it learns goes into `part`; the coordinator reads it after."""
        if part.send_model:
            await self._send_round_start(part, prepared)
        part.offer = await self._recv_offer(part, round_id)
        part.in_time = cutoff.offer(part.record, part.offer)
        if not part.in_time:
            await self._send(part, self._decision(part.record.worker_id, False, "late"))
            return
        selection = await cutoff.selection
        worker = part.record.worker_id
        granted = worker in selection.granted
        # Before the send: a send cut short by the deadline may still have reached the worker,
        # and then its reference moves when it uploads. A grant never applied means a reset.
        part.grant_sent = granted
        reason = "granted" if granted else selection.denied.get(worker, "lazy")
        await self._send(part, self._decision(worker, granted, reason))
        if granted:
            part.upload = await self._recv_upload(part, round_id)

    def _decision(self, worker: str, granted: bool, reason: str) -> Decision:
        version = self.state.store.version(worker) + (1 if granted else 0)
        return Decision(
            round=self.state.round, granted=granted, reason=reason, upload_ref_version=version
        )

    async def _settle(
        self, task: asyncio.Future[None], part: _WorkerRound, outcome: RoundOutcome
    ) -> None:
        """Move what one worker's task learnt into the outcome; its failure, if any, too."""
        worker = part.record.worker_id
        outcome.wire_bytes += part.wire_bytes
        outcome.downlink_bits += part.downlink_bits
        if part.offer is not None:
            outcome.train_losses[worker] = part.offer.train_loss
            outcome.train_seconds[worker] = part.offer.train_seconds
            if not part.in_time:
                outcome.denied[worker] = "late"
        error = None if task.cancelled() else task.exception()
        if task.cancelled() and part.offer is not None and not part.in_time:
            pass  # late, and the round ended while it was being told so: denied, not failed
        elif task.cancelled():
            why = "deadline" if part.offer is not None else "no offer by the cut-off"
            self._fail(part.record, why, outcome)
        elif isinstance(error, _Failure):
            self._fail(part.record, error.reason, outcome)
        elif isinstance(error, LinkClosed):
            self._fail(part.record, "disconnected", outcome)
        elif isinstance(error, ProtocolViolation):
            await self._reject(part.record, error, outcome)
            self._fail(part.record, f"rejected: {error.reason}", outcome)
        elif error is not None:
            raise error

    def _fail(self, record: WorkerRecord, reason: str, outcome: RoundOutcome) -> None:
        outcome.failed[record.worker_id] = reason
        log.warning("worker failed the round", worker=record.worker_id, reason=reason)

    async def _reject(
        self, record: WorkerRecord, violation: ProtocolViolation, outcome: RoundOutcome
    ) -> None:
        outcome.rejected[record.worker_id] = violation.code.value
        log.error(
            "protocol violation: session rejected",
            worker=record.worker_id,
            code=violation.code.value,
            reason=violation.reason,
        )
        # Nothing a refused worker stored is reused; on its next Hello the versions differ,
        # so both sides restart from zero, explicitly.
        self.state.store.reset(record.worker_id)
        link = record.link
        if link is not None:
            self.registry.detach(link)
            await link.reject(violation)

    # ------------------------------------------------------------ phases

    async def _send(self, part: _WorkerRound, message: MasterMessage) -> None:
        link = part.record.link
        if link is None:
            raise LinkClosed("not connected")
        # Into the worker's own count, and only after the await: `total += await send()` in
        # concurrent tasks reads the total before the await and loses the others' additions.
        size = await link.send(message)
        part.wire_bytes += size

    async def _send_round_start(self, part: _WorkerRound, prepared: PreparedRound) -> None:
        record = part.record
        link = record.link
        if link is None:
            raise LinkClosed("not connected")
        payload = prepared.payload_for(record.download_version)
        sent_bytes = await link.send_payload(payload)  # awaited first: no lost update
        part.wire_bytes += sent_bytes
        part.downlink_bits += payload.bits
        record.download_version = payload.version
        if record.first_download_version < 0:
            record.first_download_version = payload.version

    async def _next(
        self, part: _WorkerRound, round_id: int, expected: tuple[type, ...]
    ) -> WorkerMessage:
        """The worker's next message for this round; heartbeats and stale messages are absorbed."""
        record = part.record
        link = record.link
        if link is None:
            raise LinkClosed("not connected")
        while True:
            received = await link.recv()
            part.wire_bytes += received.wire_bytes
            part.heard = True
            record.seen()
            message = received.message
            if isinstance(message, Heartbeat | EvalResult):
                continue
            message_round = getattr(message, "round", None)
            if message_round is not None and message_round < round_id:
                log.info(
                    "late message discarded",
                    worker=record.worker_id,
                    kind=type(message).__name__,
                    message_round=message_round,
                )
                continue
            if message_round is not None and message_round > round_id:
                raise ProtocolViolation(
                    ViolationCode.INVALID_ARGUMENT,
                    f"message for round {message_round} during round {round_id}",
                )
            if not isinstance(message, expected):
                raise ProtocolViolation(
                    ViolationCode.FAILED_PRECONDITION,
                    f"expected {' or '.join(t.__name__ for t in expected)}, "
                    f"got {type(message).__name__}",
                )
            return message

    async def _recv_offer(self, part: _WorkerRound, round_id: int) -> UploadOffer:
        message = await self._next(part, round_id, (UploadOffer, Skip))
        if isinstance(message, Skip):
            part.skipped = True
            raise _Failure(f"worker skipped: {message.reason}")
        assert isinstance(message, UploadOffer)
        if message.wants_upload and message.cost_bits <= 0:
            raise ProtocolViolation(
                ViolationCode.INVALID_ARGUMENT, "offer wants to upload with cost_bits 0"
            )
        return message

    def _select(self, offers: dict[WorkerRecord, UploadOffer], outcome: RoundOutcome) -> Selection:
        shares = _sample_shares(offers) if self.settings.by_sample_share else {}
        candidates = [
            Offer(
                worker_id=r.worker_id,
                wants_upload=o.wants_upload,
                cost_bits=o.cost_bits,
                energy=o.energy,
                forced=o.forced,
                weight=shares.get(r.worker_id, 1.0),
            )
            for r, o in offers.items()
        ]
        selection = select_uploads(
            candidates,
            sel_clients=self.settings.sel_clients,
            up_budget_bits=self.settings.up_budget_bits,
        )
        for worker_id, reason in selection.denied.items():
            if reason == "lazy":
                outcome.skipped.append(worker_id)
            else:
                outcome.denied[worker_id] = reason
        return selection

    async def _recv_upload(self, part: _WorkerRound, round_id: int) -> list[EncodedTensor]:
        shapes = [tuple(w.shape) for w in self.state.weights]
        reassembler = Reassembler(expected_shapes=shapes)
        version = self.state.store.version(part.record.worker_id)
        while not reassembler.complete:
            message = await self._next(part, round_id, (UpdateChunk,))
            assert isinstance(message, UpdateChunk)
            if message.upload_ref_version != version:
                # Master and worker disagree about the reference: an honest worker can get
                # here (a reset it has not read yet), so this ends in a reset, not a rejection.
                raise _Failure(
                    f"reference mismatch: upload against version {message.upload_ref_version}, "
                    f"master holds {version}"
                )
            try:
                for chunk in message.tensors:
                    reassembler.add(chunk)
            except CodecError as error:
                raise ProtocolViolation(ViolationCode.INVALID_ARGUMENT, str(error)) from error
        try:
            encoded = reassembler.finish()
            self.state.check_upload_codec(encoded)
        except (CodecError, ValueError) as error:
            raise ProtocolViolation(ViolationCode.INVALID_ARGUMENT, str(error)) from error
        return encoded

    async def _reset(
        self, records: Sequence[WorkerRecord], reason: str, outcome: RoundOutcome
    ) -> None:
        """Reset these workers' references on both sides: the master's copy now, the worker's by
        a ResetReference (sent concurrently, each bounded: a frozen worker must not hold the
        round; if the message never arrives, the versions differ at its next upload or Hello,
        and that ends in a reset too)."""
        if not records:
            return
        for record in records:
            self.state.store.reset(record.worker_id)
            log.warning(
                "reference reset",
                worker=record.worker_id,
                reason=reason,
                failure=outcome.failed.get(record.worker_id, ""),
            )
        message = ResetReference(
            round=self.state.round,
            reason=reason,
            upload_ref_version=0,
            download_ref_version=self.state.downlink.version,
        )
        parts = [_WorkerRound(r) for r in records if r.link is not None]
        sends = [asyncio.wait_for(self._send(p, message), RESET_SEND_S) for p in parts]
        await asyncio.gather(*sends, return_exceptions=True)
        outcome.wire_bytes += sum(p.wire_bytes for p in parts)

    def _apply(self, parts: Sequence[_WorkerRound], outcome: RoundOutcome) -> None:
        """Store the arrived uploads; a refused one (flq.algorithm.screening) is recorded and its
        worker reset in the store here, on the wire with the step's refusals."""
        uploads = {p.record.worker_id: p.upload for p in parts if p.upload is not None}
        refused = self.state.apply_uploads(uploads)
        for worker_id, encoded in sorted(uploads.items()):
            bits = sum(e.cost_bits() for e in encoded)
            outcome.uplink_bits += bits  # on the wire either way
            if worker_id in refused:
                outcome.refused[worker_id] = refused[worker_id]
                outcome.failed[worker_id] = f"refused: {refused[worker_id]}"
                continue
            outcome.upload_bits[worker_id] = bits
            outcome.fresh.append(worker_id)

    def _note_presence(self, parts: Sequence[_WorkerRound], sitting_out: set[str]) -> None:
        """Workers that answered this round (an offer, even late, or a Skip) are present; a
        contribution whose worker stayed away too long stops counting (flq.algorithm.store).
        Workers not invited (`sitting_out`) are neither: their counts do not move."""
        present = {p.record.worker_id for p in parts if p.offer is not None or p.skipped}
        for part in parts:
            worker = part.record.worker_id
            heard = worker in present or part.heard
            self._silent[worker] = 0 if heard else self._silent.get(worker, 0) + 1
        for worker_id in self.state.store.note_round(present, sitting_out):
            log.warning(
                "stale contribution no longer counts: worker absent",
                worker=worker_id,
                rounds=self.state.store.absent(worker_id),
            )

    async def _advise(self, round_id: int, outcome: RoundOutcome) -> WeightDecision | None:
        """The advisor's weights for this round's contributors (None without an advisor)."""
        if self.advisor is None:
            return None
        fresh = set(outcome.fresh)
        ids = self.state.store.contributors(fresh)
        records = {w: self.registry.get(w) for w in ids}
        samples = {w: float(r.num_samples if r is not None else 0) for w, r in records.items()}
        stats = update_stats(self.state.store, samples)  # against the sample-weighted aggregate
        contributors = [facts_for(w, records[w], round_id, w in fresh, stats.get(w)) for w in ids]
        signals = self.progress.signals(round_id)
        return await advise_within(self.advisor, round_id, contributors, signals)

    async def _step(self, outcome: RoundOutcome, decision: WeightDecision | None) -> None:
        samples = {r.worker_id: r.num_samples for r in self.registry.all()}
        step = self.state.step(samples, fresh=set(outcome.fresh), decision=decision)
        for worker_id, reason in step.refused.items():
            outcome.refused[worker_id] = reason
            outcome.failed[worker_id] = f"refused: {reason}"
        refused = [self.registry.get(w) for w in sorted(outcome.refused)]
        await self._reset([r for r in refused if r is not None], "contribution refused", outcome)
        outcome.weights = step.weights
        outcome.weights_source = step.source
        if decision is not None:
            outcome.llm_confidence = decision.confidence
            outcome.llm_reasoning = decision.reasoning
        outcome.lazy_scalar = self.state.lazy_scalar

    async def _fuse(self, round_id: int, outcome: RoundOutcome) -> None:
        """The fusion step, after the server step (none without [fusion])."""
        if self.fusion is not None:
            outcome.fusion, fused = await self.fusion.run(self.state.weights, round_id)
            if fused is not None:
                self.state.apply_fused(fused)


def invited(
    connected: Sequence[WorkerRecord], participation: float, seed: int, round_id: int
) -> list[WorkerRecord]:
    """The workers invited to round `round_id`: all of them at participation 1, else
    ceil(participation * n) (at least one) drawn without replacement by a generator seeded with
    (seed, round), from the connected workers in id order, so a rerun invites the same ones."""
    if participation >= 1.0 or len(connected) <= 1:
        return list(connected)
    ordered = sorted(connected, key=lambda r: r.worker_id)
    count = max(1, math.ceil(participation * len(ordered)))
    picks = np.random.default_rng([seed, round_id]).choice(len(ordered), count, replace=False)
    return [ordered[i] for i in sorted(picks)]


def _sample_shares(offers: dict[WorkerRecord, UploadOffer]) -> dict[str, float]:
    """Each offering worker's share of the round's samples (equal shares if none reports any)."""
    return normalise({r.worker_id: float(o.num_samples) for r, o in offers.items()})


def _weighted_loss(offers: dict[WorkerRecord, UploadOffer]) -> float:
    total = sum(o.num_samples for o in offers.values())
    if total == 0:
        return float("nan")
    return float(np.sum([o.train_loss * o.num_samples for o in offers.values()]) / total)


async def _close_quietly(link: WorkerLink, goodbye: Shutdown) -> None:
    try:
        await link.send(goodbye)
    except LinkClosed:
        pass
    await link.close()

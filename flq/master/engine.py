"""The round engine: one FLQ round over whatever transport the links use.

configure -> send the model -> collect offers -> select -> decide -> collect uploads -> aggregate ->
step. Every wait is bounded by the round deadline; a worker that misses it, drops its link or breaks
the protocol is a recorded failure of that round, never a stall. The math lives in flq.algorithm;
this module only sequences it and counts what crosses the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import structlog

from flq.algorithm import Offer, normalise, select_uploads
from flq.codec import CodecError, EncodedTensor, Reassembler
from flq.link import LinkClosed, ProtocolViolation, WorkerLink
from flq.master.handshake import check_hello, reconcile_references, welcome_for
from flq.master.llm import WeightAdvisor, advise_within, facts_for
from flq.master.outcome import RoundOutcome
from flq.master.prepared import PreparedRound
from flq.master.registry import Registry, WorkerRecord
from flq.master.state import MasterState, WeightDecision
from flq.types import (
    Decision,
    EvalResult,
    Heartbeat,
    ResetReference,
    RoundConfig,
    Shutdown,
    Skip,
    UpdateChunk,
    UploadOffer,
    WorkerMessage,
)

log = structlog.get_logger("flq.master")
T = TypeVar("T")

__all__ = ["EngineSettings", "RoundEngine", "RoundOutcome"]


@dataclass(frozen=True)
class EngineSettings:
    round_config: RoundConfig
    sel_clients: int = 0
    up_budget_bits: float = 0.0
    by_sample_share: bool = False  # rank offers by energy * (sample share)^2
    round_timeout_s: float = 60.0
    hello_timeout_s: float = 30.0


class _Failure(Exception):
    """One worker's round ended badly; `reason` goes into the results."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    ) -> None:
        self.state = state
        self.registry = registry
        self.settings = settings
        self.advisor = advisor  # proposes each round's aggregation weights (weighting = "llm")

    # ------------------------------------------------------------ sessions

    async def accept(self, link: WorkerLink) -> WorkerRecord:
        """Handshake on a new link: Hello in, registry and reference reconciliation, Welcome
        out (flq.master.handshake)."""
        try:
            first = await asyncio.wait_for(link.recv(), self.settings.hello_timeout_s)
        except asyncio.TimeoutError as error:
            raise ProtocolViolation(
                "DEADLINE_EXCEEDED", "no Hello within the hello timeout"
            ) from error
        hello = check_hello(first.message, link.worker_id)
        record, replaced = self.registry.attach(hello, link)
        if replaced is not None:
            await _close_quietly(
                replaced, Shutdown(self.state.round, "replaced by a new session", reconnect=False)
            )
        reset = reconcile_references(hello, record, self.state)
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
        3. select uploads under the top-k / bit-budget rule and tell every worker its decision;
        4. collect the granted uploads; a granted upload that never arrived resets that
           worker's reference on both sides;
        5. store the uploads, add the round to the registry's counters, ask the weight advisor
           (if any) and step the global model with every stored contribution.

        Each phase runs all workers concurrently under one deadline; a worker that misses it,
        leaves or breaks the protocol fails this round alone (`outcome.failed`).
        """
        round_id = self.state.round
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.settings.round_timeout_s
        records = self.registry.connected()
        outcome = RoundOutcome(round=round_id, participants=[r.worker_id for r in records])

        prepared = PreparedRound(
            round_id,
            self.state.downlink.prepare(self.state.weights),
            self.settings.round_config,
            self.state.lazy_scalar,
        )
        sent = await self._each(
            records, lambda r: self._send_round_start(r, prepared, outcome), deadline, outcome
        )
        offers = await self._each(
            sent, lambda r: self._recv_offer(r, round_id, outcome), deadline, outcome
        )
        granted = self._select(offers, outcome)
        decided = await self._each(
            list(offers), lambda r: self._send_decision(r, granted, outcome), deadline, outcome
        )
        uploaders = [r for r in decided if r.worker_id in granted]
        uploads = await self._each(
            uploaders, lambda r: self._recv_upload(r, round_id, outcome), deadline, outcome
        )
        await self._reset_lost_uploads(uploaders, uploads, outcome)
        self._apply(uploads, outcome)
        self.registry.record_round(outcome)
        decision = await self._advise(round_id, outcome)
        self._step(offers, outcome, decision)
        outcome.seconds = time.perf_counter() - started
        self.state.round += 1
        return outcome

    async def _each(
        self,
        records: Sequence[WorkerRecord],
        step: Callable[[WorkerRecord], Awaitable[T]],
        deadline: float,
        outcome: RoundOutcome,
    ) -> dict[WorkerRecord, T]:
        """Run `step` for every worker concurrently until the deadline; failures are recorded."""
        if not records:
            return {}
        loop = asyncio.get_running_loop()
        tasks = {asyncio.ensure_future(step(r)): r for r in records}
        try:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        finally:
            # Past the deadline, or the round itself cancelled (forced stop): no task outlives it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        results: dict[WorkerRecord, T] = {}
        for task, record in tasks.items():
            if task in pending:
                self._fail(record, "deadline", outcome)
                continue
            error = task.exception()
            if error is None:
                results[record] = task.result()
            elif isinstance(error, _Failure):
                self._fail(record, error.reason, outcome)
            elif isinstance(error, LinkClosed):
                self._fail(record, "disconnected", outcome)
            elif isinstance(error, ProtocolViolation):
                await self._reject(record, error, outcome)
                self._fail(record, f"rejected: {error.reason}", outcome)
            else:
                raise error
        return results

    def _fail(self, record: WorkerRecord, reason: str, outcome: RoundOutcome) -> None:
        outcome.failed[record.worker_id] = reason
        log.warning("worker failed the round", worker=record.worker_id, reason=reason)

    async def _reject(
        self, record: WorkerRecord, violation: ProtocolViolation, outcome: RoundOutcome
    ) -> None:
        outcome.rejected[record.worker_id] = violation.code
        log.error(
            "protocol violation: session rejected",
            worker=record.worker_id,
            code=violation.code,
            reason=violation.reason,
        )
        link = record.link
        if link is not None:
            self.registry.detach(link)
            await link.reject(violation)

    # ------------------------------------------------------------ phases

    async def _send(self, record: WorkerRecord, message: object, outcome: RoundOutcome) -> None:
        link = record.link
        if link is None:
            raise LinkClosed("not connected")
        outcome.wire_bytes += await link.send(message)  # type: ignore[arg-type]

    async def _send_round_start(
        self, record: WorkerRecord, prepared: PreparedRound, outcome: RoundOutcome
    ) -> None:
        link = record.link
        if link is None:
            raise LinkClosed("not connected")
        payload = prepared.payload_for(record.download_version)
        sent_bytes = await link.send_payload(payload)  # awaited first: no lost update
        outcome.wire_bytes += sent_bytes
        outcome.downlink_bits += payload.bits
        record.download_version = payload.version

    async def _next(
        self, record: WorkerRecord, round_id: int, outcome: RoundOutcome, expected: tuple[type, ...]
    ) -> WorkerMessage:
        """The worker's next message for this round; heartbeats and stale messages are absorbed."""
        link = record.link
        if link is None:
            raise LinkClosed("not connected")
        while True:
            received = await link.recv()
            outcome.wire_bytes += received.wire_bytes
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
                    "INVALID_ARGUMENT", f"message for round {message_round} during round {round_id}"
                )
            if not isinstance(message, expected):
                raise ProtocolViolation(
                    "FAILED_PRECONDITION",
                    f"expected {' or '.join(t.__name__ for t in expected)}, "
                    f"got {type(message).__name__}",
                )
            return message

    async def _recv_offer(
        self, record: WorkerRecord, round_id: int, outcome: RoundOutcome
    ) -> UploadOffer:
        message = await self._next(record, round_id, outcome, (UploadOffer, Skip))
        if isinstance(message, Skip):
            raise _Failure(f"worker skipped: {message.reason}")
        assert isinstance(message, UploadOffer)
        if message.wants_upload and message.cost_bits <= 0:
            raise ProtocolViolation("INVALID_ARGUMENT", "offer wants to upload with cost_bits 0")
        outcome.train_losses[record.worker_id] = message.train_loss
        return message

    def _select(self, offers: dict[WorkerRecord, UploadOffer], outcome: RoundOutcome) -> set[str]:
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
        return set(selection.granted)

    async def _send_decision(
        self, record: WorkerRecord, granted: set[str], outcome: RoundOutcome
    ) -> None:
        worker = record.worker_id
        ok = worker in granted
        reason = "granted" if ok else outcome.denied.get(worker, "lazy")
        await self._send(
            record,
            Decision(
                round=self.state.round,
                granted=ok,
                reason=reason,
                upload_ref_version=self.state.store.version(worker) + (1 if ok else 0),
            ),
            outcome,
        )

    async def _recv_upload(
        self, record: WorkerRecord, round_id: int, outcome: RoundOutcome
    ) -> list[EncodedTensor]:
        shapes = [tuple(w.shape) for w in self.state.weights]
        reassembler = Reassembler(expected_shapes=shapes)
        version = self.state.store.version(record.worker_id)
        while not reassembler.complete:
            message = await self._next(record, round_id, outcome, (UpdateChunk,))
            assert isinstance(message, UpdateChunk)
            if message.upload_ref_version != version:
                raise ProtocolViolation(
                    "FAILED_PRECONDITION",
                    f"upload against reference version {message.upload_ref_version}, "
                    f"master holds {version}",
                )
            try:
                for chunk in message.tensors:
                    reassembler.add(chunk)
            except CodecError as error:
                raise ProtocolViolation("INVALID_ARGUMENT", str(error)) from error
        try:
            encoded = reassembler.finish()
            self.state.check_upload_codec(encoded)
        except (CodecError, ValueError) as error:
            raise ProtocolViolation("INVALID_ARGUMENT", str(error)) from error
        return encoded

    async def _reset_lost_uploads(
        self,
        uploaders: list[WorkerRecord],
        uploads: dict[WorkerRecord, list[EncodedTensor]],
        outcome: RoundOutcome,
    ) -> None:
        """A granted upload that never fully arrived: the worker may have advanced its reference,
        the master has not. Reset both sides explicitly rather than let them drift apart."""
        for record in uploaders:
            if record in uploads:
                continue
            self.state.store.reset(record.worker_id)
            log.warning(
                "granted upload lost: reference reset",
                worker=record.worker_id,
                reason=outcome.failed.get(record.worker_id, "?"),
            )
            if record.link is not None:
                try:
                    await self._send(
                        record,
                        ResetReference(
                            round=self.state.round,
                            reason="granted upload did not arrive",
                            upload_ref_version=0,
                            download_ref_version=self.state.downlink.version,
                        ),
                        outcome,
                    )
                except LinkClosed:
                    pass

    def _apply(
        self, uploads: dict[WorkerRecord, list[EncodedTensor]], outcome: RoundOutcome
    ) -> None:
        for record, encoded in sorted(uploads.items(), key=lambda item: item[0].worker_id):
            bits = sum(e.cost_bits() for e in encoded)
            self.state.store.apply_upload(record.worker_id, encoded)
            outcome.upload_bits[record.worker_id] = bits
            outcome.uplink_bits += bits
            outcome.selected.append(record.worker_id)

    async def _advise(self, round_id: int, outcome: RoundOutcome) -> WeightDecision | None:
        """The advisor's weights for this round's contributors (None without an advisor)."""
        if self.advisor is None:
            return None
        fresh = set(outcome.selected)
        contributors = [
            facts_for(w, self.registry.get(w), round_id, w in fresh)
            for w in self.state.store.contributors(fresh)
        ]
        return await advise_within(self.advisor, round_id, contributors)

    def _step(
        self,
        offers: dict[WorkerRecord, UploadOffer],
        outcome: RoundOutcome,
        decision: WeightDecision | None,
    ) -> None:
        samples = {r.worker_id: r.num_samples for r in self.registry.all()}
        step = self.state.step(samples, fresh=set(outcome.selected), decision=decision)
        outcome.weights = step.weights
        outcome.weights_source = step.source
        if decision is not None:
            outcome.llm_confidence = decision.confidence
            outcome.llm_reasoning = decision.reasoning
        outcome.lazy_scalar = self.state.lazy_scalar
        outcome.train_loss = _weighted_loss(offers)


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

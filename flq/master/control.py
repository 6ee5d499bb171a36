"""The master's control plane: what the servicer sees of a running master.

It holds the run's state name, the federation and its bookkeeper once built, and the stop
request; it answers Status, Stop and GetGlobalModel, serves each worker session through the
round engine, and counts refused calls into the metrics. The daemon builds one and keeps only
signals, servers and the shutdown order.
"""

from __future__ import annotations

import asyncio
import math

import structlog

from flq.codec import EncodedTensor, encode_float32
from flq.config import Config
from flq.link import LinkClosed, ProtocolViolation, SessionLink, ViolationCode
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.federation import Federation
from flq.metrics import MasterMetrics, MasterSources
from flq.types import ModelInfo, Shutdown, StatusReply, WorkerStatus

log = structlog.get_logger("flq.master")
GOODBYE_TIMEOUT_S = 2.0
RECONNECT_AFTER_MS = 2000


class ControlPlane:
    """Status, global model and stop of one master (the servicer's `MasterControl`)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state_name = "starting"  # starting | waiting | training | stopping | finished
        self.stop_requested = asyncio.Event()
        self.federation: Federation | None = None
        self.books: RoundBookkeeper | None = None
        self.attached = asyncio.Event()  # the federation is built (sessions held until then)
        self.held_sessions = 0  # sessions waiting for it
        self.metrics = MasterMetrics(
            MasterSources(self.connected_count, lambda: self.state_name),
            up_budget_bits=cfg.budget_selection.up_budget_bits,
        )

    def attach(self, federation: Federation, books: RoundBookkeeper) -> None:
        self.federation, self.books = federation, books
        self.attached.set()

    # ------------------------------------------------------------ MasterControl (servicer)

    async def serve_session(self, link: SessionLink) -> None:
        """A worker's session, from handshake to the end of its link. One that arrives while
        the federation loads waits for it (its Hello stays unread); a stop ends the wait."""
        fed = await self._federation_or_stop()
        if fed is None or self.stop_requested.is_set():
            raise ProtocolViolation(
                ViolationCode.UNAVAILABLE, "master is not accepting workers now"
            )
        record = await fed.engine.accept(link)
        try:
            await link.wait_ended()
        finally:
            fed.registry.detach(link)
            log.info("worker disconnected", worker=record.worker_id, session=link.session_id)

    async def _federation_or_stop(self) -> Federation | None:
        if self.federation is not None:
            return self.federation
        self.held_sessions += 1
        built = asyncio.ensure_future(self.attached.wait())
        stopped = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({built, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.held_sessions -= 1
            built.cancel()
            stopped.cancel()
        return self.federation

    def status(self) -> StatusReply:
        fed, books = self.federation, self.books
        last = None if books is None else books.last_outcome
        totals = {} if books is None else books.totals
        return StatusReply(
            round=0 if fed is None else fed.state.round - 1,
            max_rounds=self.cfg.system.max_rounds,
            state=self.state_name,
            accuracy=math.nan if books is None else books.last_accuracy,
            loss=math.nan if books is None else books.last_loss,
            up_budget_bits=int(self.cfg.budget_selection.up_budget_bits),
            last_round_uplink_bits=0 if last is None else last.uplink_bits,
            total_uplink_bits=totals.get("uplink_bits", 0),
            total_downlink_bits=totals.get("downlink_bits", 0),
            workers=self._worker_statuses(),
            mode=self.cfg.flq_algorithm.mode,
            model=self._model_info(),
            aggregation_weights={} if last is None else dict(last.weights),
            weights_source="" if last is None else last.weights_source,
            llm_confidence=math.nan if last is None else last.llm_confidence,
            llm_reasoning="" if last is None else last.llm_reasoning,
        )

    def request_stop(self, reason: str) -> int:
        """Stop starting rounds (the current one finishes); returns the last completed round."""
        if not self.stop_requested.is_set():
            log.info("stop requested", reason=reason)
            self.stop_requested.set()
        return 0 if self.federation is None else self.federation.state.round - 1

    def global_model(self) -> tuple[int, list[EncodedTensor]]:
        fed = self.federation
        if fed is None:
            raise ProtocolViolation(ViolationCode.UNAVAILABLE, "no model yet")
        return fed.state.round - 1, [encode_float32(w) for w in fed.model_weights()]

    def count_rejected(self, reason: str) -> None:
        self.metrics.count_rejected(reason)

    # ------------------------------------------------------------ helpers

    def connected_count(self) -> int:
        return 0 if self.federation is None else len(self.federation.registry.connected())

    async def dismiss_workers(self) -> None:
        """Tell every connected worker the master is going (and whether to come back)."""
        fed = self.federation
        if fed is None:
            return
        finished = self.state_name == "finished"
        goodbye = Shutdown(
            fed.state.round - 1,
            "training finished" if finished else "master stopping",
            reconnect=not finished,
            reconnect_after_ms=RECONNECT_AFTER_MS,
        )
        for record in fed.registry.connected():
            link = record.link
            if link is None:
                continue
            try:
                await asyncio.wait_for(link.send(goodbye), GOODBYE_TIMEOUT_S)
            except (LinkClosed, asyncio.TimeoutError):
                pass
            await link.close()

    def _worker_statuses(self) -> tuple[WorkerStatus, ...]:
        if self.federation is None:
            return ()
        return tuple(
            WorkerStatus(
                r.worker_id,
                r.connected,
                r.last_seen,
                r.num_samples,
                r.uplink_bits,
                r.uploads,
                r.skips,
                r.failures,
            )
            for r in self.federation.registry.all()
        )

    def _model_info(self) -> ModelInfo:
        if self.federation is None:
            return ModelInfo(
                self.cfg.model.label, self.cfg.dataset.label, self.cfg.model.hidden_units
            )
        return self.federation.model_info()

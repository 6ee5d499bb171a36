"""One worker's side of the protocol, independent of the transport.

`WorkerState` holds what must survive a reconnect (the upload reference, the downlink reference,
the lazy-rule history); `run_session` drives one connection: Hello, Welcome, then rounds until the
master says goodbye or the link drops. Training runs in a thread so heartbeats keep flowing while
a long local epoch runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import structlog

from flq.algorithm import DownlinkReceiver, UploadReference
from flq.codec import CodecError, EncodedTensor, Reassembler, group_chunks, split_tensors
from flq.link import LinkClosed, MasterLink
from flq.types import (
    PROTOCOL_VERSION,
    Decision,
    DeviceInfo,
    Heartbeat,
    Hello,
    Location,
    MasterMessage,
    ModelIdentity,
    ResetReference,
    RoundConfig,
    RoundStart,
    Shutdown,
    TrainResult,
    TrainSpec,
    UpdateChunk,
    UploadOffer,
    Welcome,
)

log = structlog.get_logger("flq.worker")
T = TypeVar("T")


class Trainer(Protocol):
    """What a session needs from local training (flq.learning.trainer.LocalTrainer fits)."""

    @property
    def num_samples(self) -> int: ...

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> TrainResult: ...


TRAINING_THREAD = "flq-local-training"


async def in_training_thread(func: Callable[..., T], *args: object) -> T:
    """`func(*args)` in a daemon thread, awaited like asyncio.to_thread. A local epoch cannot be
    interrupted, and asyncio.run joins the threads of its executor before it returns: a worker
    told to stop would sit out the epoch. Nothing joins a daemon thread; the CLI ends the process
    (flq.cli.runtime.exit_now_if_training) instead of waiting for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # the round bound in the log context, as to_thread

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = context.run(func, *args), None
        except BaseException as raised:  # handed to the awaiting coroutine
            result, error = None, raised
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while we trained: nobody waits for the result
            pass

    threading.Thread(target=run, name=TRAINING_THREAD, daemon=True).start()
    return await done


class SessionEnd(enum.Enum):
    SHUTDOWN = "shutdown"  # the master said goodbye for good
    RECONNECT = "reconnect"  # the master asked us to come back later
    CLOSED = "closed"  # the link dropped


@dataclass
class SessionOutcome:
    end: SessionEnd
    reason: str
    reconnect_after_s: float = 0.0


class ProtocolError(RuntimeError):
    """The master sent something we cannot follow; the session ends and we reconnect."""


def worker_seed(worker_id: str) -> int:
    """A seed that is the same for `worker_id` in every process. Python's hash() of a str is
    salted per process (PYTHONHASHSEED), so it would make stochastic rounding irreproducible."""
    return int.from_bytes(hashlib.sha256(worker_id.encode("utf-8")).digest()[:8], "little")


@dataclass
class WorkerState:
    """Everything a worker keeps across connections."""

    worker_id: str
    seed: int = 0
    upload: UploadReference | None = None
    downlink: DownlinkReceiver = field(default_factory=DownlinkReceiver)
    rounds_done: int = 0
    connected_once: bool = False  # set when a session reached Welcome (resets the backoff)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng([self.seed, worker_seed(self.worker_id)])

    @property
    def upload_version(self) -> int:
        return 0 if self.upload is None else self.upload.version

    def reset_upload(self, reason: str) -> None:
        log.warning(
            "upload reference reset",
            worker=self.worker_id,
            reason=reason,
            old_version=self.upload_version,
        )
        self.upload = None

    def reset_downlink(self, reason: str) -> None:
        log.warning(
            "downlink reference reset",
            worker=self.worker_id,
            reason=reason,
            old_version=self.downlink.version,
        )
        self.downlink = DownlinkReceiver()


@dataclass(frozen=True)
class SessionOptions:
    """How a worker session behaves beside what the master dictates: what its Hello reports
    (device, location) and how often it sends heartbeats while it trains."""

    device: DeviceInfo = field(default_factory=DeviceInfo)
    location: Location = field(default_factory=Location)
    heartbeat_interval_s: float = 5.0
    features: dict[str, float] = field(default_factory=dict)  # sent in Hello (LLM weighting)
    model: ModelIdentity = field(default_factory=ModelIdentity)  # sent in Hello, checked there


def train_spec_from(config: RoundConfig) -> TrainSpec:
    return TrainSpec(
        local_steps=config.local_steps,
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        l2=config.l2,
        prox_mu=config.prox_mu,
        optimizer=config.optimizer,
    )


async def run_session(
    state: WorkerState,
    trainer: Trainer,
    link: MasterLink,
    options: SessionOptions | None = None,
    on_connected: Callable[[], object] | None = None,
) -> SessionOutcome:
    """Drive one connection until it ends; never raises for a dropped link or for a message
    from the master it cannot follow (that session ends; the worker reconnects)."""
    opts = options or SessionOptions()
    session = _Session(state, trainer, link, opts, on_connected)
    try:
        return await session.run()
    except LinkClosed as closed:
        return SessionOutcome(SessionEnd.CLOSED, str(closed))
    except (ProtocolError, CodecError) as error:
        log.error("protocol error: leaving the session", worker=state.worker_id, error=str(error))
        # Whatever the master sent may have left us off its downlink; a keyframe at the next
        # Hello is cheaper than a second failure.
        state.reset_downlink("protocol error")
        return SessionOutcome(SessionEnd.CLOSED, f"protocol error: {error}")


class _Session:
    def __init__(
        self,
        state: WorkerState,
        trainer: Trainer,
        link: MasterLink,
        options: SessionOptions,
        on_connected: Callable[[], object] | None,
    ) -> None:
        self.on_connected = on_connected
        self.state = state
        self.trainer = trainer
        self.link = link
        self.options = options
        self.phase = "idle"
        self.current_round = 0
        self.pending: MasterMessage | None = None  # a message read ahead while waiting

    async def run(self) -> SessionOutcome:
        await self.link.send(
            Hello(
                worker_id=self.state.worker_id,
                protocol_version=PROTOCOL_VERSION,
                num_samples=self.trainer.num_samples,
                device=self.options.device,
                location=self.options.location,
                upload_ref_version=self.state.upload_version,
                download_ref_version=self.state.downlink.version,
                features=self.options.features,
                model=self.options.model,
            )
        )
        welcome = await self._recv()
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected Welcome, got {type(welcome).__name__}")
        self._on_welcome(welcome)
        self.state.connected_once = True
        if self.on_connected is not None:
            self.on_connected()
        while True:
            message = await self._recv()
            outcome = await self._dispatch(message)
            if outcome is not None:
                return outcome

    async def _recv(self) -> MasterMessage:
        if self.pending is not None:
            message, self.pending = self.pending, None
            return message
        while True:
            message = (await self.link.recv()).message
            if not isinstance(message, Heartbeat):
                return message

    def _on_welcome(self, welcome: Welcome) -> None:
        log.info(
            "connected",
            worker=self.state.worker_id,
            session=welcome.session_id,
            master_round=welcome.round,
            reset=welcome.reset_references,
        )
        if welcome.reset_references and self.state.upload is not None:
            self.state.reset_upload("master asked for a reset on connect")
        held = self.state.downlink.version
        if held and welcome.download_ref_version < held:
            # A master behind us (restarted from an older checkpoint) will send a keyframe; drop
            # ours so we never apply a delta to it. Behind the master, we keep it: the master
            # sends the deltas we missed if it sent us this version itself, else a keyframe.
            self.state.reset_downlink("downlink version ahead of the master's")

    async def _dispatch(self, message: MasterMessage) -> SessionOutcome | None:
        if isinstance(message, Shutdown):
            end = SessionEnd.RECONNECT if message.reconnect else SessionEnd.SHUTDOWN
            log.info(
                "master closed the session", reason=message.reason, reconnect=message.reconnect
            )
            return SessionOutcome(end, message.reason, message.reconnect_after_ms / 1000.0)
        if isinstance(message, ResetReference):
            self.state.reset_upload(message.reason)
            return None
        if isinstance(message, RoundStart):
            return await self._run_round(message)
        if isinstance(message, Decision):
            # A decision for a round we already left (we were late): nothing to do.
            log.debug("late decision ignored", round=message.round)
            return None
        raise ProtocolError(f"unexpected {type(message).__name__} outside a round")

    async def _collect_round_start(
        self, first: RoundStart
    ) -> tuple[RoundStart, list[EncodedTensor]]:
        parts: list[RoundStart] = [first]
        while len(parts) < first.parts:
            message = await self._recv()
            if (
                not isinstance(message, RoundStart)
                or message.round != first.round
                or message.part != len(parts)
            ):
                raise ProtocolError(
                    f"round {first.round}: expected RoundStart part {len(parts)}/{first.parts}, "
                    f"got {type(message).__name__}"
                )
            parts.append(message)
        reassembler = Reassembler()
        for part in parts:
            for chunk in part.tensors:
                reassembler.add(chunk)
        return first, reassembler.finish()

    async def _run_round(self, first: RoundStart) -> SessionOutcome | None:
        start, encoded = await self._collect_round_start(first)
        round_id, config = start.round, start.config
        self.current_round = round_id
        structlog.contextvars.bind_contextvars(round=round_id)
        is_keyframe = self._is_keyframe(encoded)
        try:
            weights = self.state.downlink.apply(encoded, is_keyframe, start.download_ref_version)
        except (CodecError, ValueError) as error:
            raise ProtocolError(f"round {round_id}: cannot apply downlink: {error}") from error
        began = time.monotonic()
        result = await self._train(weights, config)
        # The trainer's own clock when it keeps one: it leaves out the wait for this event loop
        # (busy with other sessions in a simulation), which is not the board's training time.
        train_seconds = result.seconds if result.seconds > 0 else time.monotonic() - began
        reference = self._reference_for(weights, config)
        reference.observe_scalar(start.lazy_scalar)
        # Rounds count from 1; the lazy rule's warm-up counts from 0.
        prepared = reference.prepare(result.delta, round_id - 1, self.state.rng)
        await self.link.send(
            UploadOffer(
                round=round_id,
                wants_upload=prepared.wants_upload,
                cost_bits=prepared.cost_bits,
                energy=prepared.energy,
                clock=prepared.clock,
                forced=prepared.forced,
                train_loss=result.loss,
                num_samples=self.trainer.num_samples,
                train_seconds=train_seconds,
            )
        )
        log.info(
            "trained",
            seconds=round(train_seconds, 3),
            steps=result.steps,
            loss=round(result.loss, 6),
            wants_upload=prepared.wants_upload,
        )
        decision = await self._await_decision(round_id)
        if decision is None:
            reference.skip()
            return None
        if not decision.granted:
            reference.skip()
            return None
        await self._upload(round_id, reference.version, prepared.encoded)
        reference.commit(prepared)
        self.state.rounds_done += 1
        return None

    def _is_keyframe(self, encoded: list[EncodedTensor]) -> bool:
        from flq.codec import Codec

        return all(getattr(e, "codec", None) == Codec.FLOAT32 for e in encoded)

    def _reference_for(self, weights: list[np.ndarray], config: RoundConfig) -> UploadReference:
        shapes = [w.shape for w in weights]
        ref = self.state.upload
        if ref is None or ref.shapes != shapes or ref.config_key != UploadReference.key_for(config):
            if ref is not None:  # its Q_hat and residual cannot carry over: say so
                self.state.reset_upload("the master changed the upload settings or model")
            ref = UploadReference.from_round_config(shapes, config)
            self.state.upload = ref
        return ref

    async def _train(self, weights: list[np.ndarray], config: RoundConfig) -> TrainResult:
        self.phase = "training"
        interval = self.options.heartbeat_interval_s
        beat = asyncio.create_task(self._heartbeats()) if math.isfinite(interval) else None
        try:
            return await in_training_thread(self.trainer.train, weights, train_spec_from(config))
        finally:
            self.phase = "idle"
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_interval_s)
            await self.link.send(Heartbeat(self.current_round, self.phase, time.time()))

    async def _await_decision(self, round_id: int) -> Decision | None:
        """The master's answer to our offer; None if the round moved on without one."""
        while True:
            message = await self._recv()
            if isinstance(message, Decision) and message.round == round_id:
                return message
            if isinstance(message, Decision):
                continue  # a stale decision from an earlier round
            if isinstance(message, ResetReference):
                self.state.reset_upload(message.reason)
                continue
            # Anything else (the next RoundStart, a Shutdown) means this round is over for us.
            self.pending = message
            return None

    async def _upload(self, round_id: int, version: int, encoded: list[EncodedTensor]) -> None:
        self.phase = "uploading"
        for group in group_chunks(split_tensors(encoded)):
            await self.link.send(UpdateChunk(round_id, version, tuple(group)))
        self.phase = "idle"

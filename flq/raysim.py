"""`flq simulate --ray`: the simulated workers as Ray actors, the round engine in the driver.

Each actor holds one worker's data partition, trainer and session state, and runs the same
session code as `flq-worker` over the worker end of an in-memory link (flq.memlink). The driver
sees each actor through `RayWorkerLink`, one more implementation of the transport seam
(flq.link.WorkerLink): the engine, the bit accounting and rounds.csv are those of the in-process
simulation and of the daemons. Ray does the placement (CPU/GPU reservations from the `[ray]`
config, spread over the nodes); we build no scheduler.

Ray is imported only here and only when `--ray` is given (the `ray` extra).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import structlog

from flq.config import Config
from flq.errors import FlqError, Unreachable, UsageError
from flq.link import (
    DownlinkPayload,
    LinkClosed,
    PayloadCache,
    ProtocolViolation,
    Received,
    ViolationCode,
)
from flq.memlink import MemoryMasterLink, Pipe, wire_size
from flq.types import MasterMessage, WorkerMessage

log = structlog.get_logger("flq.raysim")
T = TypeVar("T")
_session_numbers = itertools.count(1)
_simulation_numbers = itertools.count(1)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise UsageError("--ray needs Ray on this machine: pip install 'flq[ray]'") from error
    return ray


# ---------------------------------------------------------------- inside the actor


class SimulatedWorker:
    """One simulated worker inside a Ray actor: its partition, trainer and session state, and
    the worker end of an in-memory link whose master end the driver reaches by actor calls."""

    def __init__(self, cfg: Config, index: int) -> None:
        from flq.blas import limit_blas_threads
        from flq.log import configure_logging, quiet_third_party_env
        from flq.worker.session import WorkerState
        from flq.worker.training import build_trainer

        quiet_third_party_env()
        limit_blas_threads()  # as a worker daemon does (Ray's OMP_NUM_THREADS, if set, wins)
        _limit_tensorflow_threads(cfg.ray.num_cpus)
        configure_logging("warning", "json")  # Ray forwards worker output to the driver
        self.worker_id = f"w{index}"
        # The same seeds as the in-process simulation: the trainer's (system.seed + index) and
        # the session's stochastic rounding (system.seed and the worker id), process-independent.
        # Its own partition only, as a worker daemon holds it: twenty copies of the decoded
        # training set would cost 20 x 188 MB for Fashion-MNIST.
        self._trainer = build_trainer(cfg, self.worker_id, index, keep_data_cache=False)[0]
        self._state = WorkerState(self.worker_id, seed=cfg.system.seed)
        self._to_worker: Pipe[MasterMessage] = Pipe()
        self._to_master: Pipe[WorkerMessage] = Pipe()
        self._in_order = InOrder[tuple[MasterMessage, int]]()
        self._session: asyncio.Task[Any] | None = None

    async def start(self) -> str:
        """Start the session (it sends its Hello); returns the id of the node it runs on."""
        import ray

        from flq.sim import run_simulated_session

        link = MemoryMasterLink(self._to_worker, self._to_master)
        session = run_simulated_session(self._state, self._trainer, link)
        self._session = asyncio.create_task(session)
        return str(ray.get_runtime_context().get_node_id())

    async def deliver(self, seq: int, message: MasterMessage, size: int) -> None:
        """Message number `seq` from the master. Ray may run an async actor's calls out of
        order (a payload's argument is fetched first), so they are put back in order here."""
        for ready, ready_size in self._in_order.add(seq, (message, size)):
            self._to_worker.put(ready, ready_size)

    async def receive(self) -> list[tuple[WorkerMessage, int]]:
        """The worker's next messages (at least one), with their wire sizes; [] once its
        session has ended."""
        try:
            first = await self._to_master.get()
        except LinkClosed:
            return []
        return [first, *self._to_master.get_ready()]

    async def close(self, code: str = "", reason: str = "") -> None:
        """End the session; with a code, as the master's rejection (a protocol violation)."""
        violation = ProtocolViolation(ViolationCode(code), reason) if code else None
        self._to_worker.close(violation)
        self._to_master.close()

    async def finished(self) -> str:
        """Wait for the session to end; how it ended."""
        if self._session is None:
            return "never started"
        outcome = await self._session
        return str(outcome.end.value)


def _limit_tensorflow_threads(num_cpus: float) -> None:
    """As many TensorFlow threads as CPUs reserved: each actor otherwise sizes its pools to
    every core of the node, and twenty actors on a node would fight over them."""
    if num_cpus > 0:
        threads = str(math.ceil(num_cpus))
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", threads)
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", threads)


class InOrder(Generic[T]):
    """Releases items numbered 0, 1, 2, ... in that order, whatever order they arrive in."""

    def __init__(self) -> None:
        self._next = 0
        self._early: dict[int, T] = {}

    def add(self, seq: int, item: T) -> list[T]:
        if seq < self._next or seq in self._early:
            raise ValueError(f"message number {seq} arrived twice")
        self._early[seq] = item
        ready = []
        while self._next in self._early:
            ready.append(self._early.pop(self._next))
            self._next += 1
        return ready


# ---------------------------------------------------------------- in the driver


class RayWorkerLink:
    """The master's end of one simulated worker's session: actor calls instead of a stream.

    One reader task pulls the worker's messages into a local pipe, so `recv` can be cancelled
    (the engine's deadlines) without losing a message already taken from the actor."""

    def __init__(
        self,
        worker_id: str,
        actor: Any,
        ray: Any,
        payload_sizes: PayloadCache[int],
        payload_refs: PayloadCache[Any],
    ) -> None:
        self._worker_id = worker_id
        self._actor = actor
        self._ray_error = ray.exceptions.RayError
        self._payload_sizes = payload_sizes
        self._payload_refs = payload_refs
        self._numbers = itertools.count()
        self._session_id = f"ray-{next(_session_numbers)}"
        self._incoming: Pipe[WorkerMessage] = Pipe()
        self._reader = asyncio.create_task(self._read())

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def session_id(self) -> str:
        return self._session_id

    async def send(self, message: MasterMessage) -> int:
        size = wire_size(message)
        await self._call("deliver", next(self._numbers), message, size)
        return size

    async def send_payload(self, payload: DownlinkPayload) -> int:
        # One object-store copy of each message per round, shared by every worker (and fetched
        # once per node), instead of one serialised copy per call.
        sizes = self._payload_sizes.get(payload)
        refs = self._payload_refs.get(payload)
        calls = [
            self._call("deliver", next(self._numbers), ref, size)
            for ref, size in zip(refs, sizes, strict=True)
        ]
        await asyncio.gather(*calls)
        return sum(sizes)

    async def recv(self) -> Received:
        message, size = await self._incoming.get()
        return Received(message, size)

    async def reject(self, violation: ProtocolViolation) -> None:
        await self._close(violation.code.value, violation.reason)

    async def close(self) -> None:
        await self._close()

    async def wait_ended(self) -> None:
        """Until the worker's session has ended (or its actor is lost): the reader's end."""
        await self._incoming.ended.wait()

    async def finished(self, timeout_s: float) -> bool:
        """Whether the session ended within `timeout_s`; stops the reader either way."""
        try:
            await asyncio.wait_for(self._call("finished"), timeout_s)
            return True
        except (asyncio.TimeoutError, LinkClosed):
            return False
        finally:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _close(self, *why: str) -> None:
        try:
            await self._call("close", *why)
        except LinkClosed:
            pass  # the actor is gone: the session is over either way

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._actor, method).remote(*args)
        except self._ray_error as error:
            raise LinkClosed(f"simulated worker {self._worker_id}: {error}") from error

    async def _read(self) -> None:
        try:
            while batch := await self._call("receive"):
                for message, size in batch:
                    self._incoming.put(message, size)
        except LinkClosed as error:
            log.warning("simulated worker lost", worker=self._worker_id, error=str(error))
        finally:
            self._incoming.close()


class RayWorkers:
    """A simulation's workers as actors on a Ray cluster (flq.sim.SimulatedWorkers)."""

    def __init__(self, cfg: Config, address: str) -> None:
        self._cfg = cfg
        self._address = address
        self._ray: Any = None
        self._connected_here = False
        self._actors: list[Any] = []
        self._links: list[RayWorkerLink] = []

    async def start(self) -> list[RayWorkerLink]:
        ray = self._ray = import_ray()
        self._connected_here = connect(ray, self._address)
        spec = self._cfg.ray
        actor_class = ray.remote(SimulatedWorker)
        # Named after the worker (`ray list actors`, ray.get_actor), unique per simulation:
        # two simulations of one driver share its namespace.
        prefix = f"flq-sim{next(_simulation_numbers)}-"
        count = self._cfg.system.total_workers
        self._actors = [
            actor_class.options(
                name=f"{prefix}w{index}",
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                scheduling_strategy="SPREAD",  # over the nodes, not packed onto the first
            ).remote(self._cfg, index)
            for index in range(count)
        ]
        nodes = await self._await_placement(spec.start_timeout_s)
        log.info("ray workers running", workers=count, nodes=len(set(nodes)), address=self._address)
        sizes, refs = PayloadCache(wire_size), PayloadCache(ray.put)
        self._links = [
            RayWorkerLink(f"w{index}", actor, ray, sizes, refs)
            for index, actor in enumerate(self._actors)
        ]
        return list(self._links)

    async def stop(self) -> None:
        from flq.sim import GOODBYE_WAIT_S

        links, actors, self._links, self._actors = self._links, self._actors, [], []
        try:
            await asyncio.gather(*(link.finished(GOODBYE_WAIT_S) for link in links))
        finally:
            for actor in actors:
                self._ray.kill(actor)
            if self._connected_here:
                self._connected_here = False
                self._ray.shutdown()

    async def _await_placement(self, timeout_s: float) -> list[str]:
        """Every actor built and its session started; the node each runs on."""
        calls = {
            asyncio.ensure_future(_start(actor)): f"w{i}" for i, actor in enumerate(self._actors)
        }
        _, pending = await asyncio.wait(calls, timeout=timeout_s)
        for call in pending:
            call.cancel()
        if pending:
            not_placed = [worker for call, worker in calls.items() if call in pending]
            raise FlqError(self._not_placed(not_placed, timeout_s))
        nodes = []
        for call in calls:  # in worker order
            error = call.exception()
            if error is not None:
                raise FlqError(f"simulated worker {calls[call]} did not start: {error}")
            nodes.append(call.result())
        return nodes

    def _not_placed(self, workers: Sequence[str], timeout_s: float) -> str:
        spec = self._cfg.ray
        total, free = self._ray.cluster_resources(), self._ray.available_resources()
        return (
            f"{len(workers)} of {len(self._actors)} simulated workers not running after "
            f"{timeout_s:g} s (ray.start_timeout_s): {', '.join(workers)}. Each reserves "
            f"num_cpus={spec.num_cpus:g}, num_gpus={spec.num_gpus:g} (the [ray] config); the "
            f"cluster has CPU={total.get('CPU', 0):g}, GPU={total.get('GPU', 0):g} "
            f"(free: CPU={free.get('CPU', 0):g}, GPU={free.get('GPU', 0):g})"
        )


async def _start(actor: Any) -> str:
    return str(await actor.start.remote())


AUTO = "auto"
PROBE_TIMEOUT_S = 5.0


def connect(ray: Any, address: str) -> bool:
    """Join the cluster at `address` ("auto": the one `ray start` began on this machine, or
    $RAY_ADDRESS); False if this process was already connected to one."""
    if ray.is_initialized():
        return False
    probe_gcs(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as error:
        raise Unreachable(
            f"no Ray cluster at --ray {address}: {error} "
            "(start one with `ray start --head`, or give its address as host:port)"
        ) from error
    return True


def check_address(address: str) -> tuple[str, int] | None:
    """`address` as (host, port), None for auto; a clear error for anything else."""
    if address == AUTO:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--ray: expected auto or HOST:PORT, got {address!r}")
    return host, int(port)


def probe_gcs(address: str) -> None:
    """Fail fast on an address where nothing listens: ray.init retries a dead one for minutes."""
    endpoint = check_address(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as error:
        raise Unreachable(
            f"no Ray cluster at --ray {address}: {error} (is `ray start --head` running there?)"
        ) from error

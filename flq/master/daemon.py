"""The master daemon: gRPC server + health, the round loop, checkpoints, results, shutdown.

Shutdown runs in a fixed order with deadlines (STYLE.md #7): stop starting rounds, mark health
NOT_SERVING, let the current round finish within its own deadline, write the final checkpoint and
results, tell the workers, stop the server with a grace period. A second signal skips the waiting.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flq import notify
from flq.codec import EncodedTensor, encode_float32
from flq.config import Config
from flq.grpc_options import SERVER_OPTIONS
from flq.link import LinkClosed, ProtocolViolation
from flq.master.engine import RoundEngine
from flq.master.federation import Federation, build_federation
from flq.master.loop import RoundBookkeeper
from flq.master.servicer import FLQServicer, GrpcWorkerLink
from flq.metrics import MasterMetrics, MasterSources, MetricsServer
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.security import MasterSecurity, load_master_security, server_credentials
from flq.types import ModelInfo, Shutdown, StatusReply, WorkerStatus

log = structlog.get_logger("flq.master")
SERVICE_NAME = "flq.v1.FLQ"
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class MasterOptions:
    host: str | None = None  # default: from system.master_url
    port: int | None = None  # default: from system.master_url; 0 = pick a free port
    resume: bool = False
    run_dir: Path | None = None  # where results/checkpoint go; default logging.result_dir
    # Builds the federation; tests and benchmarks pass one with a numpy model (no TensorFlow).
    federation_factory: Callable[[Config], Federation] = build_federation
    metrics_port: int | None = None  # Prometheus /metrics: None = off, 0 = any free port
    metrics_host: str = "0.0.0.0"


class MasterDaemon:
    def __init__(self, cfg: Config, options: MasterOptions | None = None) -> None:
        self.cfg = cfg
        self.options = options or MasterOptions()
        self.run_dir = Path(self.options.run_dir or cfg.logging.result_dir)
        self.federation: Federation | None = None
        self.books: RoundBookkeeper | None = None
        self.state_name = "starting"
        self.stop_requested = asyncio.Event()
        self.forced = False
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._started = time.time()
        self.ready = asyncio.Event()
        self._security: MasterSecurity | None = None
        self.metrics = MasterMetrics(
            MasterSources(self._connected_count, lambda: self.state_name),
            up_budget_bits=cfg.budget_selection.up_budget_bits,
        )
        self.metrics_server: MetricsServer | None = None

    # ------------------------------------------------------------ MasterControl (servicer)

    @property
    def engine(self) -> RoundEngine:
        assert self.federation is not None, "federation not built yet"
        return self.federation.engine

    async def serve_session(self, link: GrpcWorkerLink) -> None:
        if self.federation is None or self.stop_requested.is_set():
            raise ProtocolViolation("UNAVAILABLE", "master is not accepting workers now")
        record = await self.engine.accept(link)
        try:
            await link.wait_ended()
        finally:
            self.federation.registry.detach(link)
            log.info("worker disconnected", worker=record.worker_id, session=link.session_id)

    def status(self) -> StatusReply:
        fed = self.federation
        workers = (
            ()
            if fed is None
            else tuple(
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
                for r in fed.registry.all()
            )
        )
        books = self.books
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
            workers=workers,
            mode=self.cfg.flq_algorithm.mode,
            model=self._model_info(),
            aggregation_weights={} if last is None else dict(last.weights),
            weights_source="" if last is None else last.weights_source,
            llm_confidence=math.nan if last is None else last.llm_confidence,
            llm_reasoning="" if last is None else last.llm_reasoning,
        )

    def _connected_count(self) -> int:
        return 0 if self.federation is None else len(self.federation.registry.connected())

    def _model_info(self) -> ModelInfo:
        cfg, fed = self.cfg, self.federation
        spec = None if fed is None else getattr(fed.evaluation, "spec", None)
        return ModelInfo(
            name=cfg.model.name,
            dataset=cfg.dataset.name,
            hidden_units=cfg.model.hidden_units,
            input_shape=() if spec is None else tuple(spec.input_shape),
            num_classes=0 if spec is None else spec.num_classes,
            parameters=0 if fed is None else fed.parameters,
        )

    def request_stop(self, reason: str) -> int:
        if not self.stop_requested.is_set():
            log.info("stop requested", reason=reason)
            self.stop_requested.set()
        return 0 if self.federation is None else self.federation.state.round - 1

    def global_model(self) -> tuple[int, list[EncodedTensor]]:
        if self.federation is None:
            raise ProtocolViolation("UNAVAILABLE", "no model yet")
        state = self.federation.state
        return state.round - 1, [encode_float32(w) for w in self.federation.model_weights()]

    def count_rejected(self, reason: str) -> None:
        self.metrics.count_rejected(reason)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self._install_signal_handlers()
        watchdog = notify.start_watchdog()  # systemd's WatchdogSec: pings from this loop
        self._security = load_master_security(self.cfg.security)  # bad files fail fast
        self.federation = await asyncio.to_thread(self.options.federation_factory, self.cfg)
        self.books = RoundBookkeeper(self.federation, self.run_dir, resume=self.options.resume)
        await self._start_server()
        try:
            await self._round_loop()
        except asyncio.CancelledError:
            if not self.forced:
                raise
            log.warning("forced exit: the current round is abandoned")
        finally:
            await self._shutdown()
            await notify.stop_watchdog(watchdog)

    async def _start_server(self) -> None:
        security = self._security or load_master_security(self.cfg.security)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_FLQServicer_to_server(FLQServicer(self, security.auth), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host = self.options.host or self.cfg.system.master_host
        port = self.cfg.system.master_port if self.options.port is None else self.options.port
        if security.tls is not None:
            self.port = server.add_secure_port(f"{host}:{port}", server_credentials(security.tls))
        else:
            self.port = server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port} (address in use?)")
        await server.start()
        self._server = server
        self._start_metrics()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.state_name = "waiting"
        log.info(
            "master listening",
            address=f"{host}:{self.port}",
            run_dir=str(self.run_dir),
            mode=self.cfg.flq_algorithm.mode,
            tls=security.tls is not None,
            metrics_port=None if self.metrics_server is None else self.metrics_server.port,
        )
        self.ready.set()
        notify.ready(f"listening on {host}:{self.port}")

    def _start_metrics(self) -> None:
        if self.options.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics.registry, self.options.metrics_port, self.options.metrics_host
            )

    def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    async def _set_health(self, status: int) -> None:
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    async def _round_loop(self) -> None:
        fed, books = self.federation, self.books
        assert fed is not None and books is not None
        system = self.cfg.system
        while not self.stop_requested.is_set() and fed.state.round <= system.max_rounds:
            if not await self._wait_for_workers():
                break
            self.state_name = "training"
            outcome = await self.engine.run_round()
            await books.finish_round(outcome)
            self.metrics.observe_round(outcome, books.last_accuracy, books.last_loss)
            notify.status(
                f"round {outcome.round}/{system.max_rounds}, accuracy {books.last_accuracy:.4f}"
            )
            if 0 < system.target_accuracy <= books.last_accuracy:
                log.info("target accuracy reached", accuracy=books.last_accuracy)
                break
        self.state_name = "finished" if fed.state.round > system.max_rounds else "stopping"

    async def _wait_for_workers(self) -> bool:
        assert self.federation is not None
        needed = self.cfg.system.min_workers
        while not self.stop_requested.is_set():
            waiter = asyncio.create_task(
                self.federation.registry.wait_for_workers(needed, self.cfg.system.connect_timeout_s)
            )
            stopper = asyncio.create_task(self.stop_requested.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if waiter not in done:
                waiter.cancel()
                return False
            if waiter.result():
                return True
            log.warning(
                "still waiting for workers",
                connected=len(self.federation.registry.connected()),
                needed=needed,
            )
        return False

    async def _shutdown(self) -> None:
        notify.stopping()
        if self.state_name != "finished":
            self.state_name = "stopping"
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.books is not None:
            self.books.save()
            self.books.close()
        self._write_summary()
        if self.federation is not None:
            await self.federation.aclose()
        finished = self.state_name == "finished"
        if self.federation is not None:
            goodbye = Shutdown(
                self.federation.state.round - 1,
                "training finished" if finished else "master stopping",
                reconnect=not finished,
                reconnect_after_ms=2000,
            )
            for record in self.federation.registry.connected():
                link = record.link
                if link is None:
                    continue
                try:
                    await asyncio.wait_for(link.send(goodbye), 2.0)
                except (LinkClosed, asyncio.TimeoutError):
                    pass
                await link.close()
        if self._server is not None:
            await self._server.stop(0 if self.forced else STOP_GRACE_S)
        self._stop_metrics()
        log.info("master stopped", state=self.state_name)

    def _write_summary(self) -> None:
        if self.federation is None or self.books is None:
            return
        summary = {
            "rounds": self.federation.state.round - 1,
            "state": self.state_name,
            "accuracy": self.books.last_accuracy,
            "loss": self.books.last_loss,
            "parameters": self.federation.parameters,
            **self.books.totals,
            "mode": self.cfg.flq_algorithm.mode,
            "seconds": time.time() - self._started,
            **self.federation.size_summary(self.books.totals["uplink_bits"]),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()

        def on_signal(signum: int) -> None:
            if self.stop_requested.is_set():
                log.warning("second signal: forcing exit", signal=signal.Signals(signum).name)
                self.forced = True
                if main_task is not None:
                    main_task.cancel()
                return
            self.request_stop(f"signal {signal.Signals(signum).name}")

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except (NotImplementedError, RuntimeError):  # not the main thread / not POSIX
                pass

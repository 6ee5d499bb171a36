"""The master daemon: signals, servers (gRPC + health, metrics) and the shutdown order.

The rounds run in a `RoundDriver` (flq/master/driver.py), the servicer talks to a
`ControlPlane` (flq/master/control.py); the daemon starts them and stops them.

Shutdown runs in a fixed order with deadlines (STYLE.md #7): stop starting rounds, mark health
NOT_SERVING, let the current round finish within its own deadline, write the final checkpoint and
results, tell the workers, stop the server with a grace period. A second signal skips the waiting.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flq import notify
from flq.config import Config
from flq.grpc_options import SERVER_OPTIONS, SERVICE_NAME
from flq.master.auth import AuthInterceptor
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.control import ControlPlane
from flq.master.driver import RoundDriver, StopRules
from flq.master.federation import Federation, build_federation
from flq.master.outcome import RoundOutcome
from flq.master.servicer import FLQServicer
from flq.master.startup import StartupError, listen_problem, prepare_run_dir
from flq.metrics import MetricsServer
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.security import MasterSecurity, load_master_security, server_credentials

log = structlog.get_logger("flq.master")
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class MasterOptions:
    """How this master process runs (beside the Config): address, resume, where results go."""

    host: str | None = None  # default: from system.master_url
    port: int | None = None  # default: from system.master_url; 0 = pick a free port
    resume: bool = False
    run_dir: Path | None = None  # where results/checkpoint go; default logging.result_dir
    # Builds the federation; tests and benchmarks pass one with a numpy model (no TensorFlow).
    federation_factory: Callable[[Config], Federation] = build_federation
    metrics_port: int | None = None  # Prometheus /metrics: None = off, 0 = any free port
    metrics_host: str = "0.0.0.0"


class MasterDaemon:
    """One master process: builds the federation, serves gRPC/health/metrics, drives the rounds,
    handles SIGINT/SIGTERM (a second one forces exit) and shuts down in order."""

    def __init__(self, cfg: Config, options: MasterOptions | None = None) -> None:
        self.cfg = cfg
        self.options = options or MasterOptions()
        self.run_dir = Path(self.options.run_dir or cfg.logging.result_dir)
        self.control = ControlPlane(cfg)
        self.metrics = self.control.metrics
        self.forced = False
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._started = time.time()
        self.listening = asyncio.Event()  # the port serves health and accepts sessions
        self.ready = asyncio.Event()  # ... and the federation is built: rounds may start
        self._security: MasterSecurity | None = None
        self.metrics_server: MetricsServer | None = None

    @property
    def federation(self) -> Federation | None:
        return self.control.federation

    @property
    def state_name(self) -> str:
        return self.control.state_name

    def request_stop(self, reason: str) -> int:
        return self.control.request_stop(reason)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self._install_signal_handlers()
        watchdog = notify.start_watchdog()  # systemd's WatchdogSec: pings from this loop
        self._security = load_master_security(self.cfg.security)  # bad files fail fast
        prepare_run_dir(self.run_dir, self.cfg, resume=self.options.resume)
        self._server = self._bind_server(self._security)  # a taken port too, before TF loads
        driver: RoundDriver | None = None
        try:
            # Listen first: health answers (NOT_SERVING) and sessions are accepted, held at
            # their Hello, while the federation — TensorFlow, the model, the test split —
            # loads in a thread (15-50 s on a loaded board).
            await self._start_server()
            federation = await self._load_federation()
            books = RoundBookkeeper(
                federation,
                self.run_dir,
                resume=self.options.resume,
                checkpoint_every=self.cfg.system.checkpoint_every,
            )
            # Rounds (and so evaluations) start only from here: the driver is built on a
            # whole federation, its evaluator loaded, never on a half-built one.
            self.control.attach(federation, books)
            await self._serve()
            driver = self._driver(federation, books)
            await driver.run()
        except asyncio.CancelledError:
            if not self.forced:
                raise
            log.warning("forced exit: the current round is abandoned")
        finally:
            finished = driver is not None and driver.finished
            self.control.state_name = "finished" if finished else "stopping"
            await self._shutdown()
            await notify.stop_watchdog(watchdog)

    async def _load_federation(self) -> Federation:
        began = time.monotonic()
        log.info("loading the model and the evaluator", dataset=self.cfg.dataset.name)
        federation = await asyncio.to_thread(self.options.federation_factory, self.cfg)
        log.info("model loaded", seconds=round(time.monotonic() - began, 2))
        return federation

    def _driver(self, federation: Federation, books: RoundBookkeeper) -> RoundDriver:
        system = self.cfg.system
        rules = StopRules(
            max_rounds=system.max_rounds,
            target_accuracy=system.target_accuracy,
            min_workers=system.min_workers,
            connect_timeout_s=system.connect_timeout_s,
        )
        return RoundDriver(
            federation.engine,
            books,
            rules,
            stop=self.control.stop_requested,
            on_start=self._round_starting,
            on_finish=self._round_finished,
        )

    def _round_starting(self, round_id: int) -> None:
        self.control.state_name = "training"

    def _round_finished(self, outcome: RoundOutcome, row: object) -> None:
        books = self.control.books
        assert books is not None
        self.metrics.observe_round(outcome, books.last_accuracy, books.last_loss)
        notify.status(
            f"round {outcome.round}/{self.cfg.system.max_rounds}, "
            f"accuracy {books.last_accuracy:.4f}"
        )

    def _bind_server(self, security: MasterSecurity) -> grpc.aio.Server:
        """The gRPC server with its services, bound to its port (serving from _start_server)."""
        auth = AuthInterceptor(security.auth, self.control.count_rejected)
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[auth])
        pb_grpc.add_FLQServicer_to_server(FLQServicer(self.control), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host = self.options.host or self.cfg.system.master_host
        port = self.cfg.system.master_port if self.options.port is None else self.options.port
        try:
            if security.tls is not None:
                credentials = server_credentials(security.tls)
                self.port = server.add_secure_port(f"{host}:{port}", credentials)
            else:
                self.port = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc says only "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {host}:{port}: {listen_problem(host, port)}")
        return server

    async def _start_server(self) -> None:
        """Serve from now on: health NOT_SERVING until the federation is ready (workers
        waiting to reconnect poll it), sessions held at their Hello (ControlPlane)."""
        assert self._server is not None and self._security is not None
        security, host = self._security, self.options.host or self.cfg.system.master_host
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self._start_metrics()
        log.info(
            "master listening",
            address=f"{host}:{self.port}",
            run_dir=str(self.run_dir),
            mode=self.cfg.flq_algorithm.mode,
            tls=security.tls is not None,
            metrics_port=None if self.metrics_server is None else self.metrics_server.port,
        )
        self.listening.set()
        notify.ready(f"listening on {host}:{self.port}")

    async def _serve(self) -> None:
        """The federation is built: health SERVING, held sessions go on to their Welcome."""
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.control.state_name = "waiting"
        log.info("master serving", workers_waiting=self.control.held_sessions)
        self.ready.set()
        notify.status("serving: waiting for workers")

    def _start_metrics(self) -> None:
        if self.options.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics.registry, self.options.metrics_port, self.options.metrics_host
            )

    def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    async def _shutdown(self) -> None:
        notify.stopping()
        await self._health.enter_graceful_shutdown()  # NOT_SERVING, for good
        control = self.control
        if control.books is not None:
            control.books.save()
            control.books.close()
            control.books.write_summary(control.state_name, time.time() - self._started)
            await self._write_final_model(control.books)
        if control.federation is not None:
            await control.federation.aclose()
        await control.dismiss_workers()
        if self._server is not None:
            await self._server.stop(0 if self.forced else STOP_GRACE_S)
        self._stop_metrics()
        log.info("master stopped", state=control.state_name)

    async def _write_final_model(self, books: RoundBookkeeper) -> None:
        """In a thread (Keras saves for a while); a failure is logged and the shutdown goes on:
        the workers still need their goodbye and the checkpoint already holds the model."""
        if self.forced:
            return
        try:
            await asyncio.to_thread(books.write_model)
        except (OSError, ValueError, RuntimeError) as error:
            log.error(
                "could not write the final model", run_dir=str(self.run_dir), error=str(error)
            )

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()

        def on_signal(signum: int) -> None:
            if self.control.stop_requested.is_set():
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

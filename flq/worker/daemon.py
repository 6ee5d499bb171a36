"""The worker daemon: device caps, local data and model, then a session kept alive until stopped.

Order matters: device caps (GPU memory limit, growth, mixed precision) must be applied before
TensorFlow initialises its runtime, so they run before the trainer is built.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import sys
from dataclasses import dataclass, field

import structlog

from flq import __version__, notify
from flq.config import Config
from flq.metrics import MetricsServer, WorkerMetrics
from flq.security import ClientTls, channel_credentials
from flq.types import DeviceInfo, Location, ModelIdentity
from flq.worker.connection import Backoff, run_connected
from flq.worker.session import SessionOptions, SessionOutcome, WorkerState
from flq.worker.tegrastats import export_board_stats

log = structlog.get_logger("flq.worker")


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str
    master: str  # host:port
    partition_index: int | None = None
    location: Location = field(default_factory=Location)
    heartbeat_interval_s: float = 5.0
    features: dict[str, float] = field(default_factory=dict)  # reported in Hello
    tls: ClientTls | None = None  # None = plaintext (warned at start-up)
    token: str | None = None  # sent as `authorization: Bearer ...`; never logged
    metrics_port: int | None = None  # Prometheus /metrics: None = off, 0 = any free port
    metrics_host: str = "0.0.0.0"


def device_info(accelerator: str) -> DeviceInfo:
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        memory_mb = 0
    return DeviceInfo(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        accelerator=accelerator,
        memory_mb=int(memory_mb),
        python=platform.python_version(),
        flq_version=__version__,
    )


class WorkerDaemon:
    def __init__(self, cfg: Config, options: WorkerOptions) -> None:
        self.cfg = cfg
        self.options = options
        self.stop = asyncio.Event()
        # Board gauges (tegrastats) are fed with flq.metrics.record_board_stats(self.metrics, ...).
        self.metrics = WorkerMetrics(options.worker_id)
        self.metrics_server: MetricsServer | None = None

    async def run(self) -> SessionOutcome:
        from flq.worker.training import build_trainer  # imports TensorFlow: only here

        self._install_signal_handlers()
        watchdog = notify.start_watchdog()  # systemd's WatchdogSec: pings from this loop
        board_stats: asyncio.Task[None] | None = None
        if self.options.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics.registry, self.options.metrics_port, self.options.metrics_host
            )
            # Jetson power, temperatures, GPU load, RAM; nothing where tegrastats is missing.
            board_stats = asyncio.create_task(export_board_stats(self.metrics))
        trainer, accelerator = await asyncio.to_thread(
            build_trainer,
            self.cfg,
            self.options.worker_id,
            self.options.partition_index,
            keep_data_cache=False,
        )
        log.info(
            "worker ready",
            worker=self.options.worker_id,
            samples=trainer.num_samples,
            master=self.options.master,
            accelerator=accelerator,
            model=str(getattr(trainer, "architecture", "")),
            tls=self.options.tls is not None,
            token=self.options.token is not None,
            metrics_port=None if self.metrics_server is None else self.metrics_server.port,
        )
        if self.options.tls is None:
            log.warning("gRPC link to the master is unencrypted: pass --tls-ca (flq certs init)")
        tls = self.options.tls
        state = WorkerState(self.options.worker_id, seed=self.cfg.system.seed)
        session_options = SessionOptions(
            device=device_info(accelerator),
            location=self.options.location,
            heartbeat_interval_s=self.options.heartbeat_interval_s,
            features=self.options.features,
            model=getattr(trainer, "architecture", ModelIdentity()),  # none when synthetic
        )
        try:
            outcome = await run_connected(
                state,
                trainer,
                self.options.master,
                self.stop,
                session_options,
                Backoff(),
                credentials=None if tls is None else channel_credentials(tls),
                on_connected=lambda: notify.ready(f"connected to {self.options.master}"),
                token=self.options.token,
                observer=self.metrics,
            )
        finally:
            if board_stats is not None:
                board_stats.cancel()
            if self.metrics_server is not None:
                self.metrics_server.close()
        notify.stopping(outcome.reason)
        await notify.stop_watchdog(watchdog)
        log.info("worker stopped", reason=outcome.reason, rounds_uploaded=state.rounds_done)
        return outcome

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self.stop.is_set():
                log.warning("second signal: exiting now")
                sys.exit(1)
            log.info("stopping", signal=signal.Signals(signum).name)
            notify.stopping()
            self.stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass

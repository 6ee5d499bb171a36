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

from flq import __version__
from flq.config import Config
from flq.types import DeviceInfo, Location
from flq.worker.connection import Backoff, run_connected
from flq.worker.session import SessionOptions, SessionOutcome, WorkerState

log = structlog.get_logger("flq.worker")


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str
    master: str  # host:port
    partition_index: int | None = None
    location: Location = field(default_factory=Location)
    heartbeat_interval_s: float = 5.0


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

    async def run(self) -> SessionOutcome:
        from flq.worker.training import build_trainer  # imports TensorFlow: only here

        self._install_signal_handlers()
        trainer, accelerator = await asyncio.to_thread(
            build_trainer, self.cfg, self.options.worker_id, self.options.partition_index
        )
        log.info(
            "worker ready",
            worker=self.options.worker_id,
            samples=trainer.num_samples,
            master=self.options.master,
            accelerator=accelerator,
        )
        state = WorkerState(self.options.worker_id, seed=self.cfg.system.seed)
        session_options = SessionOptions(
            device=device_info(accelerator),
            location=self.options.location,
            heartbeat_interval_s=self.options.heartbeat_interval_s,
        )
        outcome = await run_connected(
            state, trainer, self.options.master, self.stop, session_options, Backoff()
        )
        log.info("worker stopped", reason=outcome.reason, rounds_uploaded=state.rounds_done)
        return outcome

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self.stop.is_set():
                log.warning("second signal: exiting now")
                sys.exit(1)
            log.info("stopping", signal=signal.Signals(signum).name)
            self.stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass

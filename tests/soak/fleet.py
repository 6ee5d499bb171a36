"""The soak's federation: a real flq-master process and real flq-worker processes on 127.0.0.1,
which the fault injector kills, freezes and restarts as an operator's bad day would."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from flq import serde
from flq.demo import free_port
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.types import StatusReply
from tests.processes import master_args, spawn, synthetic_config, worker_args


@dataclass(frozen=True)
class FleetSettings:
    workers: int = 3
    # Long enough that a few seconds' starvation on a loaded test machine does not fail rounds.
    round_timeout_s: float = 3.0
    train_s: float = 0.1  # each honest worker's local training, emulated
    heartbeat_s: float = 0.5


@dataclass
class Fleet:
    directory: Path
    settings: FleetSettings = field(default_factory=FleetSettings)
    port: int = field(default_factory=free_port)
    master: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    master_starts: int = 0

    def __post_init__(self) -> None:
        self.run_dir = self.directory / "run"
        self.config = synthetic_config(
            self.directory / "soak.toml",
            rounds=1_000_000,
            workers=self.settings.workers,
            round_timeout_s=self.settings.round_timeout_s,
            train_s=self.settings.train_s,
            lazy_c=5,  # a connected worker uploads at least every 5 rounds: "back" is visible
        )
        self.honest = [f"w{i}" for i in range(self.settings.workers)]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def master_log(self) -> Path:
        return self.directory / "master.log"

    def worker_log(self, worker_id: str) -> Path:
        return self.directory / f"{worker_id}.log"

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        self.start_master(resume=False)
        for worker_id in self.honest:
            self.start_worker(worker_id)

    def start_master(self, *, resume: bool) -> None:
        args = master_args(self.config, self.port, self.run_dir)
        self.master = spawn([*args, "--resume"] if resume else args, self.master_log)
        self.master_starts += 1

    def signal_master(self, signum: signal.Signals) -> None:
        assert self.master is not None
        self.master.send_signal(signum)
        if signum == signal.SIGKILL:
            self.master.wait()

    def start_worker(self, worker_id: str) -> None:
        heartbeat = str(self.settings.heartbeat_s)
        args = worker_args(self.config, self.port, worker_id, "--heartbeat", heartbeat)
        self.workers[worker_id] = spawn(args, self.worker_log(worker_id))

    def signal_worker(self, worker_id: str, signum: signal.Signals) -> None:
        self.workers[worker_id].send_signal(signum)
        if signum == signal.SIGKILL:
            self.workers[worker_id].wait()

    def exited(self) -> dict[str, int]:
        """Processes that ended on their own: name -> exit code."""
        ended = {w: p.poll() for w, p in self.workers.items()}
        if self.master is not None:
            ended["master"] = self.master.poll()
        return {name: code for name, code in ended.items() if code is not None}

    def close(self) -> None:
        """Stop everything: SIGCONT first, so a frozen worker can die too."""
        processes = [*self.workers.values(), *([self.master] if self.master else [])]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()

    # ------------------------------------------------------------ the master's view

    async def status(self) -> StatusReply | None:
        """The master's Status RPC (admin is open: no token configured), None if it is down."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            try:
                reply = await pb_grpc.FLQStub(channel).Status(pb.StatusRequest(), timeout=2.0)
            except grpc.aio.AioRpcError:
                return None
        return serde.status_reply_from_proto(reply)

"""Benchmark 3: the daemons on loopback — round time, coordination overhead, scale.

    python -m bench.bench_rounds matrix              # 4/16 workers x 100k/1M params x 4 modes
    python -m bench.bench_rounds matrix --quick      # one small cell (a smoke run)
    python -m bench.bench_rounds scale               # 200 then 1000 workers, 100k params

A real master (flq.master.daemon.MasterDaemon: grpc.aio server, registry, round engine,
bookkeeping) runs in this process; the workers run the real worker code (flq.worker.connection:
one gRPC channel and Session stream each, flq.worker.session: downlink decode, lazy rule,
quantization, chunked upload) in other processes. Only training is replaced: a synthetic-gradient
trainer returns random deltas of the model's shapes at once (no TensorFlow), so worker compute
is ~0 and the whole round time is coordination: downlink, offers, selection, uploads, decoding,
aggregation and the server step, on both ends.

Beside each FLQ cell, the same run measures a plain gRPC bidi stream that moves the same bytes
(each worker's downlink payload down, its uplink payload up, in <= 1 MiB messages, raw bytes
with no protobuf) over the same number of streams and processes: the floor any protocol would pay
on this loopback. Target (engine issue): overhead <= 2 x plain transfer + 10 ms.

Figures are medians over rounds after a warm-up; the machine is shared, so compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODELS: dict[str, list[tuple[int, ...]]] = {
    # A two-layer MLP's shapes (784 -> 128 -> 10): 101,770 parameters.
    "100k": [(784, 128), (128,), (128, 10), (10,)],
    # A three-layer MLP's shapes (784 -> 1250 -> 16 -> 10): 1,001,436 parameters.
    "1M": [(784, 1250), (1250,), (1250, 16), (16,), (16, 10), (10,)],
}
MODES: dict[str, dict[str, Any]] = {
    "fedavg": {"flq_algorithm.mode": "fedavg", "flq_algorithm.b_down": 32},
    "laq8": {"flq_algorithm.mode": "laq8", "flq_algorithm.b_down": 32},
    "bbit4": {"flq_algorithm.mode": "bbit", "flq_algorithm.b_up": 4, "flq_algorithm.b_down": 8},
    "bin": {"flq_algorithm.mode": "bin", "flq_algorithm.b_down": 8},
}
CHUNK = 1 << 20  # the protocol's chunk limit, used by the plain stream too
PLAIN_METHOD = "/bench.Plain/Pipe"


def parameters(shapes: Sequence[tuple[int, ...]]) -> int:
    return int(sum(math.prod(s) for s in shapes))


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def machine() -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(pages / 2**30, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load_avg_1m": os.getloadavg()[0],
    }


# ---------------------------------------------------------------- the worker side (swarm)


class RandomDeltaTrainer:
    """Stands in for training: returns one of a few pre-drawn random deltas of the model's shapes
    (a copy, so the session may keep it), after an optional sleep. Compute time is ~0 and known."""

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], seed: int, sleep_s: float = 0.0, pool: int = 3
    ) -> None:
        rng = np.random.default_rng(seed)
        self._pool = [
            [(rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3)) for s in shapes]
            for _ in range(pool)
        ]
        self._next = 0
        self.sleep_s = sleep_s
        self.train_seconds: list[float] = []

    @property
    def num_samples(self) -> int:
        return 100

    def train(self, weights: list[np.ndarray], spec: Any) -> Any:
        from flq.types import TrainResult

        began = time.perf_counter()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        delta = [d.copy() for d in self._pool[self._next % len(self._pool)]]
        self._next += 1
        seconds = time.perf_counter() - began
        self.train_seconds.append(seconds)
        return TrainResult(delta=delta, loss=1.0, num_samples=100, steps=1, seconds=seconds)


async def run_swarm(address: str, ids: list[str], model: str, sleep_s: float) -> dict[str, Any]:
    """Many workers in this process: each its own channel (own TCP connection) and Session."""
    import flq.worker.connection as connection
    from flq.worker.connection import Backoff, run_connected
    from flq.worker.session import SessionOptions, WorkerState

    # One TCP connection per worker, as separate boards would have (gRPC otherwise shares one
    # subchannel between channels to the same target in a process).
    connection.CLIENT_OPTIONS = [*connection.CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    shapes = MODELS[model]
    stop = asyncio.Event()
    trainers = [RandomDeltaTrainer(shapes, seed=i, sleep_s=sleep_s) for i in range(len(ids))]
    options = SessionOptions(heartbeat_interval_s=math.inf if sleep_s < 1 else 5.0)
    began_cpu = time.process_time()
    tasks = [
        asyncio.create_task(
            run_connected(
                WorkerState(wid, seed=i), trainer, address, stop, options, Backoff(0.2, 2.0)
            )
        )
        for i, (wid, trainer) in enumerate(zip(ids, trainers, strict=True))
    ]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    finished = sum(1 for o in outcomes if getattr(o, "reason", "") == "training finished")
    train = [s for t in trainers for s in t.train_seconds]
    return {
        "workers": len(ids),
        "cpu_s": time.process_time() - began_cpu,
        "rss_kib": proc_status_kib(),
        "errors": errors[:5],
        "error_count": len(errors),
        "finished_cleanly": finished,  # sessions the master ended with "training finished"
        "train_s_median": statistics.median(train) if train else 0.0,
        "train_s_max": max(train) if train else 0.0,
    }


def swarm_main(args: argparse.Namespace) -> int:
    from flq.log import configure_logging

    raise_fd_limit()
    configure_logging("error", "json")
    ids = [f"w{i}" for i in range(args.first, args.first + args.count)]
    report = asyncio.run(run_swarm(args.master, ids, args.model, args.sleep))
    print("SWARM " + json.dumps(report), flush=True)
    return 0


def spawn_swarms(
    address: str, workers: int, procs: int, model: str, sleep_s: float
) -> list[subprocess.Popen[str]]:
    per = [workers // procs + (1 if i < workers % procs else 0) for i in range(procs)]
    started, first = [], 0
    for count in per:
        cmd = [sys.executable, "-m", "bench.bench_rounds", "swarm", "--master", address]
        cmd += ["--first", str(first), "--count", str(count), "--model", model]
        cmd += ["--sleep", str(sleep_s)]
        started.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        first += count
    return started


def swarm_reports(procs: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        for line in out.splitlines():
            if line.startswith("SWARM "):
                reports.append(json.loads(line[6:]))
    return reports


# ---------------------------------------------------------------- the master side


class ShapesEvaluation:
    """A model that is only shapes: zeros to start, and an evaluation that costs nothing."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.initial_weights = [np.zeros(s, np.float32) for s in shapes]
        self.parameters = parameters(shapes)

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        return 0.0, 0.0


@dataclass
class RoundTimes:
    wall: list[float] = field(default_factory=list)  # the engine's run_round
    cpu: list[float] = field(default_factory=list)  # master process CPU during run_round
    starts: list[float] = field(default_factory=list)  # when each run_round began

    def periods(self) -> list[float]:
        """Start to start: the round plus the bookkeeping after it (evaluation, checkpoint,
        results row) — what a user waits per round."""
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def timed_factory(shapes: Sequence[tuple[int, ...]], times: RoundTimes) -> Any:
    """The federation with a numpy model, its run_round wrapped to record wall and CPU time."""
    from flq.master.federation import build_federation

    def factory(cfg: Any) -> Any:
        fed = build_federation(cfg, evaluation=ShapesEvaluation(shapes))
        run_round = fed.engine.run_round

        async def timed_round() -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            times.starts.append(wall)
            outcome = await run_round()
            times.wall.append(time.perf_counter() - wall)
            times.cpu.append(time.process_time() - cpu)
            return outcome

        fed.engine.run_round = timed_round  # type: ignore[method-assign]
        return fed

    return factory


def bench_config(workers: int, rounds: int, mode: str, timeout_s: float) -> Any:
    from flq.config import default_config, with_overrides

    return with_overrides(
        default_config(),
        {
            "system.total_workers": workers,
            "system.min_workers": workers,
            "system.max_rounds": rounds,
            "system.master_url": "http://127.0.0.1:0",
            "system.eval_every": 10_000,
            "system.round_timeout_s": timeout_s,
            "system.connect_timeout_s": 600.0,
            "model.local_steps": 1,
            "lazy_selection.thr_scale": 0.0,
            "budget_selection.up_budget_bits": 0.0,
            "logging.log_level": "error",
            **MODES[mode],
        },
    )


@dataclass
class Cell:
    mode: str
    workers: int
    model: str
    parameters: int
    rounds: int
    round_s: float  # median run_round (engine) time
    period_s: float  # median start-to-start time (round + evaluation + checkpoint + results)
    master_cpu_s: float
    train_s: float
    overhead_s: float
    down_bytes_per_worker: int
    up_bytes_per_worker: int
    wire_bytes_per_round: int
    failed: int
    plain_s: float = math.nan
    target_s: float = math.nan
    meets: bool = False
    master_rss_mib: float = 0.0
    master_peak_mib: float = 0.0
    swarm_peak_mib: float = 0.0
    swarm_cpu_s_per_round: float = 0.0
    round_s_all: list[float] = field(default_factory=list)
    period_s_all: list[float] = field(default_factory=list)
    master: str = "current"  # "baseline": the master as it was before bench-driven fixes


async def run_master(cfg: Any, factory: Any, run_dir: Path, on_listening: Any) -> None:
    from flq.master.daemon import MasterDaemon, MasterOptions

    daemon = MasterDaemon(cfg, MasterOptions(run_dir=run_dir, federation_factory=factory))
    task = asyncio.create_task(daemon.run())
    await daemon.ready.wait()
    await on_listening(daemon.port)
    await task


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "rounds.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def flq_cell(
    mode: str, workers: int, model: str, rounds: int, warmup: int, procs: int, sleep_s: float
) -> Cell:
    from flq.log import configure_logging

    configure_logging("error", "json")
    shapes = MODELS[model]
    times = RoundTimes()
    cfg = bench_config(workers, rounds + warmup, mode, timeout_s=max(120.0, workers * 0.5))
    swarms: list[subprocess.Popen[str]] = []

    async def listening(port: int) -> None:
        swarms.extend(spawn_swarms(f"127.0.0.1:{port}", workers, procs, model, sleep_s))

    with tempfile.TemporaryDirectory(prefix="flq-bench-") as tmp:
        run_dir = Path(tmp)
        asyncio.run(run_master(cfg, timed_factory(shapes, times), run_dir, listening))
        rows = read_rows(run_dir)
    reports = swarm_reports(swarms, timeout=120)
    kept = slice(warmup, None)
    measured = rows[kept]
    round_s = statistics.median(times.wall[kept])
    # The synthetic trainer's own time (a copy of the delta): the median call, for every worker.
    train_s = statistics.median(r["train_s_median"] for r in reports) if reports else 0.0
    selected = [max(1, int(r["selected"])) for r in measured]
    down = statistics.median(int(r["downlink_bits"]) / 8 / workers for r in measured)
    up = statistics.median(
        int(r["uplink_bits"]) / 8 / s for r, s in zip(measured, selected, strict=True)
    )
    status = proc_status_kib()
    swarm_cpu = sum(r["cpu_s"] for r in reports)
    return Cell(
        mode=mode,
        workers=workers,
        model=model,
        parameters=parameters(shapes),
        rounds=len(measured),
        round_s=round_s,
        period_s=statistics.median(times.periods()[kept]) if len(times.starts) > 2 else math.nan,
        master_cpu_s=statistics.median(times.cpu[kept]),
        train_s=train_s,
        overhead_s=round_s - train_s,
        down_bytes_per_worker=int(down),
        up_bytes_per_worker=int(up),
        wire_bytes_per_round=int(statistics.median(int(r["wire_bytes"]) for r in measured)),
        failed=sum(int(r["failed"]) for r in rows),
        master_rss_mib=status["VmRSS"] / 1024,
        master_peak_mib=status["VmHWM"] / 1024,
        swarm_peak_mib=max((r["rss_kib"]["VmHWM"] / 1024 for r in reports), default=0.0),
        swarm_cpu_s_per_round=swarm_cpu / max(1, len(rows)),
        round_s_all=[round(t, 4) for t in times.wall],
        period_s_all=[round(t, 4) for t in times.periods()],
    )


def use_baseline_master() -> None:
    """Put back, in this process, the master as it was before the two fixes this benchmark led
    to, for an A/B on the same machine: (1) every worker's RoundStart converted to protobuf on
    its own (no per-round cache in GrpcWorkerLink), (2) checkpoints built in a BytesIO and then
    written (one extra in-memory copy of the whole state per round)."""
    import io
    import tempfile as _tempfile

    import flq.master.bookkeeper as bookkeeper
    import flq.master.checkpoint as checkpoint
    import flq.master.servicer as servicer

    async def send_payload_per_worker(self: Any, payload: Any) -> int:
        return int(await self._write([servicer._wire_form(m) for m in payload.messages]))

    def save_via_bytesio(path: Any, state: dict[str, Any]) -> None:
        target = Path(path)
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"format_version": checkpoint.FORMAT_VERSION}
        checkpoint._flatten(state, "", arrays, meta)
        buffer = io.BytesIO()
        meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        np.savez(buffer, **arrays, **{checkpoint.META_KEY: meta_bytes})
        fd, tmp = _tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    servicer.GrpcWorkerLink.send_payload = send_payload_per_worker  # type: ignore[method-assign]
    bookkeeper.save_checkpoint = save_via_bytesio  # type: ignore[assignment]


def cell_main(args: argparse.Namespace) -> int:
    """One cell in this (fresh) process, so its RSS peak is its own; prints the cell as JSON."""
    from flq.log import configure_logging

    raise_fd_limit()
    configure_logging("error", "json")
    if args.baseline:
        use_baseline_master()
    cell = flq_cell(args.mode, args.workers, args.model, args.rounds, args.warmup, 1, 0.0)
    cell.master = "baseline" if args.baseline else "current"
    print("CELL " + json.dumps(asdict(cell)), flush=True)
    return 0


def run_cell_process(mode: str, workers: int, rounds: int, baseline: bool) -> Cell:
    cmd = [sys.executable, "-m", "bench.bench_rounds", "cell", "--mode", mode]
    cmd += ["--workers", str(workers), "--rounds", str(rounds)]
    cmd += ["--baseline"] if baseline else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("CELL "))
    return Cell(**json.loads(line[5:]))


# ---------------------------------------------------------------- plain gRPC, same bytes


def _chunks(total: int) -> list[bytes]:
    full, rest = divmod(total, CHUNK)
    return [b"\x00" * CHUNK] * full + ([b"\x01" * rest] if rest else [])


async def plain_server_rounds(
    streams: int, procs: int, down: int, up: int, rounds: int, warmup: int
) -> list[float]:
    """Serve `streams` plain bidi streams; per round push `down` bytes to each and wait for
    `up` bytes back from each. Returns each round's seconds (server side)."""
    import grpc

    from flq.grpc_options import SERVER_OPTIONS

    connected: list[tuple[Any, asyncio.Queue[int]]] = []
    all_in = asyncio.Event()
    finished = asyncio.Event()
    done: list[int] = []  # handlers that returned

    async def pipe(request_iterator: Any, context: Any) -> None:
        inbox: asyncio.Queue[int] = asyncio.Queue()
        connected.append((context, inbox))
        if len(connected) == streams:
            all_in.set()

        async def reader() -> None:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                await inbox.put(len(message))

        task = asyncio.create_task(reader())
        await finished.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        done.append(1)

    handler = grpc.method_handlers_generic_handler(
        "bench.Plain", {"Pipe": grpc.stream_stream_rpc_method_handler(pipe)}
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bench_rounds",
                "plain-client",
                "--target",
                f"127.0.0.1:{port}",
                "--streams",
                str(n),
                "--down",
                str(down),
                "--up",
                str(up),
            ]
        )
        for n in [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    ]
    await all_in.wait()
    for _, inbox in connected:  # the hello each client sends first
        await inbox.get()
    payload = _chunks(down)
    times: list[float] = []
    for _ in range(rounds + warmup):
        began = time.perf_counter()

        async def one(context: Any, inbox: asyncio.Queue[int]) -> None:
            for chunk in payload:
                await context.write(chunk)
            got = 0
            while got < up:
                got += await inbox.get()

        await asyncio.gather(*(one(c, q) for c, q in connected))
        times.append(time.perf_counter() - began)
    finished.set()
    while len(done) < streams:  # let every handler end its call before the server stops
        await asyncio.sleep(0.01)
    await server.stop(1.0)
    for client in clients:
        client.wait(timeout=30)
    return times[warmup:]


async def plain_client(target: str, streams: int, down: int, up: int) -> None:
    import grpc

    from flq.grpc_options import CLIENT_OPTIONS

    upload = _chunks(up)

    async def one() -> None:
        options = [*CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = channel.stream_stream(PLAIN_METHOD)()
            await call.write(b"hello")
            got = 0
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    got += len(message)
                    if got >= down:
                        got -= down
                        for chunk in upload:
                            await call.write(chunk)
            except grpc.aio.AioRpcError:
                return

    await asyncio.gather(*(one() for _ in range(streams)))


def plain_client_main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    asyncio.run(plain_client(args.target, args.streams, args.down, args.up))
    return 0


# ---------------------------------------------------------------- the two benchmarks


def matrix(args: argparse.Namespace) -> list[Cell]:
    cells = []
    sizes = ["100k"] if args.quick else list(MODELS)
    counts = [4] if args.quick else [4, 16]
    modes = ["bbit4"] if args.quick else list(MODES)
    for model in sizes:
        for workers in counts:
            for mode in modes:
                procs = workers if args.procs == 0 else args.procs
                cell = flq_cell(mode, workers, model, args.rounds, args.warmup, procs, 0.0)
                plain = asyncio.run(
                    plain_server_rounds(
                        workers,
                        procs,
                        cell.down_bytes_per_worker,
                        cell.up_bytes_per_worker,
                        args.rounds,
                        args.warmup,
                    )
                )
                cell.plain_s = statistics.median(plain)
                cell.target_s = 2 * cell.plain_s + 0.010
                cell.meets = cell.overhead_s <= cell.target_s
                print(json.dumps(asdict(cell)), flush=True)
                cells.append(cell)
    return cells


def scale(args: argparse.Namespace) -> list[Cell]:
    """Each cell in a fresh master process (its RSS peak is its own). With --ab, the baseline
    master and the current one alternate, `--repeats` times each, on the same machine state."""
    cells = []
    for workers in args.workers:
        for _ in range(args.repeats):
            for baseline in (True, False) if args.ab else (False,):
                cell = run_cell_process(args.mode, workers, args.rounds, baseline)
                print(json.dumps(asdict(cell)), flush=True)
                cells.append(cell)
    return cells


def matrix_table(cells: list[Cell]) -> str:
    lines = [
        "| params | workers | mode | bytes down / up per worker | round (ms) "
        "| round + bookkeeping (ms) | master CPU (ms) | worker CPU per worker (ms) "
        "| plain gRPC, same bytes (ms) | target 2x+10 (ms) | round meets | master CPU meets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        worker_cpu = c.swarm_cpu_s_per_round / c.workers * 1e3
        lines.append(
            f"| {c.model} | {c.workers} | {c.mode} | "
            f"{c.down_bytes_per_worker:,} / {c.up_bytes_per_worker:,} | "
            f"{c.overhead_s * 1e3:.0f} | {c.period_s * 1e3:.0f} | {c.master_cpu_s * 1e3:.0f} | "
            f"{worker_cpu:.0f} | {c.plain_s * 1e3:.1f} | {c.target_s * 1e3:.0f} | "
            f"{'yes' if c.meets else 'no'} | "
            f"{'yes' if c.master_cpu_s <= c.target_s else 'no'} |"
        )
    return "\n".join(lines)


def scale_table(cells: list[Cell]) -> str:
    lines = [
        "| workers | master | mode | rounds | round median / max (s) "
        "| round + bookkeeping median (s) | master CPU per round (s) | master RSS peak (MiB) "
        "| failed worker-rounds | worker process peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.workers} | {c.master} | {c.mode} | {c.rounds} "
            f"| {c.round_s:.2f} / {max(c.round_s_all):.2f} "
            f"| {c.period_s:.2f} | {c.master_cpu_s:.2f} | {c.master_peak_mib:.0f} | {c.failed} "
            f"| {c.swarm_peak_mib:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("matrix", help="4/16 workers x 100k/1M params x modes, vs plain gRPC")
    m.add_argument("--rounds", type=int, default=10)
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--procs", type=int, default=0, help="worker processes (0 = one per worker)")
    m.add_argument("--quick", action="store_true")
    m.add_argument("--json", type=Path, help="also write the cells here")
    s = sub.add_parser("scale", help="one master, hundreds of workers in one process")
    s.add_argument("--workers", type=int, nargs="+", default=[200, 1000])
    s.add_argument("--rounds", type=int, default=10)
    s.add_argument("--mode", default="bbit4", choices=list(MODES))
    s.add_argument("--ab", action="store_true", help="alternate with the baseline master")
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--json", type=Path, help="also write the cells here")
    c = sub.add_parser("cell", help="(internal) one cell in this process")
    c.add_argument("--mode", default="bbit4", choices=list(MODES))
    c.add_argument("--workers", type=int, required=True)
    c.add_argument("--model", default="100k", choices=list(MODELS))
    c.add_argument("--rounds", type=int, default=10)
    c.add_argument("--warmup", type=int, default=0)
    c.add_argument("--baseline", action="store_true")
    w = sub.add_parser("swarm", help="(internal) run workers in this process")
    w.add_argument("--master", required=True)
    w.add_argument("--first", type=int, default=0)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--model", default="100k", choices=list(MODELS))
    w.add_argument("--sleep", type=float, default=0.0)
    p = sub.add_parser("plain-client", help="(internal) plain gRPC streams")
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--down", type=int, required=True)
    p.add_argument("--up", type=int, required=True)
    args = parser.parse_args(argv)

    if args.command == "swarm":
        return swarm_main(args)
    if args.command == "cell":
        return cell_main(args)
    if args.command == "plain-client":
        return plain_client_main(args)
    raise_fd_limit()
    print(json.dumps(machine()))
    cells = matrix(args) if args.command == "matrix" else scale(args)
    print(matrix_table(cells) if args.command == "matrix" else scale_table(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine(), "cells": [asdict(c) for c in cells]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

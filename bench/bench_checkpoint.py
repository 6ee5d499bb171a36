"""Benchmark: how long the master's event loop stalls while a checkpoint is written (issue 10 #12).

    python -m bench.bench_checkpoint                       # 1M, 10M and 40M parameters
    python -m bench.bench_checkpoint --json docs/results/daemons/checkpoint.json

For each model size the bookkeeper writes the checkpoint twice into a fresh run directory: once
on the loop (`RoundBookkeeper.save`, what every round did before and what shutdown still does)
and once the way a round does now (`finish_round`: snapshot on the loop, write and fsync in a
thread). A ticker task on the same loop wakes every millisecond and records how late it woke:
the longest delay is how long heartbeats, keepalives and watchdog pings would have waited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_rounds import machine
from flq.config import default_config, with_overrides
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.federation import build_federation
from flq.master.outcome import RoundOutcome

TICK_S = 0.001


class FlatModel:
    """A one-tensor numpy model of `size` parameters (no TensorFlow): the state is what counts."""

    def __init__(self, size: int) -> None:
        self.initial_weights = [np.random.default_rng(0).normal(size=size).astype(np.float32)]
        self.parameters = size

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        return 1.0, 0.5


async def longest_stall(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds `work` took, the longest a 1 ms ticker on the same loop waited past its tick)."""
    loop = asyncio.get_running_loop()
    worst = 0.0

    async def tick() -> None:
        nonlocal worst
        while True:
            before = loop.time()
            await asyncio.sleep(TICK_S)
            worst = max(worst, loop.time() - before - TICK_S)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)  # the ticker runs before the work starts
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    await asyncio.sleep(10 * TICK_S)  # let a tick held up by the work report how late it is
    ticker.cancel()
    return took, worst


async def measure(size: int) -> dict[str, Any]:
    cfg = with_overrides(default_config(), {"system.eval_every": 1000})
    with tempfile.TemporaryDirectory() as tmp:
        books = RoundBookkeeper(build_federation(cfg, FlatModel(size)), Path(tmp))
        try:

            async def on_loop() -> None:
                books.save()

            async def in_thread() -> None:
                await books.finish_round(RoundOutcome(round=1))

            loop_took, loop_stall = await longest_stall(on_loop)
            thread_took, thread_stall = await longest_stall(in_thread)
            size_mb = (Path(tmp) / "checkpoint.npz").stat().st_size / 1e6
        finally:
            books.close()
    return {
        "parameters": size,
        "checkpoint_mb": round(size_mb, 1),
        "on_loop": {"write_s": round(loop_took, 3), "longest_stall_s": round(loop_stall, 3)},
        "in_thread": {"write_s": round(thread_took, 3), "longest_stall_s": round(thread_stall, 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 40_000_000])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = [asyncio.run(measure(size)) for size in args.sizes]
    for row in rows:
        on_loop, in_thread = row["on_loop"], row["in_thread"]
        print(
            f"{row['parameters']:>11,} params, {row['checkpoint_mb']:7.1f} MB: "
            f"on the loop {on_loop['write_s']:.3f} s, stall {on_loop['longest_stall_s']:.3f} s; "
            f"in a thread {in_thread['write_s']:.3f} s, stall {in_thread['longest_stall_s']:.3f} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Codec throughput: encode and decode speed against numpy's own copy bandwidth.

    python -m bench.bench_codec           # 1M and 16M float32 values
    python -m bench.bench_codec --quick   # 1M values, fewer repetitions

Speeds are GB/s of float32 input (4 bytes per value) and, because absolute numbers depend on the
machine, also a ratio to np.copyto of the same array: copy, encode and decode are timed in turn
within each repetition and the ratio is the median of the per-repetition ratios, so drifting load
on a shared machine hits both sides alike. Peak extra memory while encoding is measured
separately with tracemalloc (numpy reports its allocations to it), as a multiple of input bytes.
Targets: ratio >= 0.25 for b in {1, 2, 4, 8}, >= 0.1 for the other rows; memory <= 2x input.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flq.codec import Codec, EncodedTensor, decode, encode

FAST_BITS = (1, 2, 4, 8)
FAST_TARGET = 0.25
OTHER_TARGET = 0.1
MEMORY_TARGET = 2.0


@dataclass(frozen=True)
class Case:
    label: str
    codec: Codec
    bits: int
    block: int = 256  # BLOCK_GRID only

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> EncodedTensor:
        # Only STOCHASTIC draws random numbers; grid rows measure round-to-nearest.
        stochastic = rng if self.codec == Codec.STOCHASTIC else None
        return encode(self.codec, x, self.bits, stochastic, block=self.block)

    @property
    def target(self) -> float:
        fast = self.bits in FAST_BITS and self.codec not in (Codec.FLOAT32, Codec.BLOCK_GRID)
        return FAST_TARGET if fast else OTHER_TARGET


CASES = (
    Case("float32", Codec.FLOAT32, 32),
    Case("float16", Codec.FLOAT16, 16),
    *(Case(f"LAQ grid b={b}", Codec.LAQ_GRID, b) for b in (1, 2, 3, 4, 8, 16)),
    Case("sign b=1", Codec.SIGN, 1),
    Case("stochastic b=8", Codec.STOCHASTIC, 8),
    Case("block grid b=3/256", Codec.BLOCK_GRID, 3, 256),
    Case("block grid b=4/1024", Codec.BLOCK_GRID, 4, 1024),
)


@dataclass(frozen=True)
class Row:
    case: Case
    values: int
    encode_gbs: float
    decode_gbs: float
    copy_gbs: float
    encode_ratio: float  # median over repetitions of copy time / encode time
    decode_ratio: float
    fresh_copy_gbs: float
    memory_ratio: float

    @property
    def meets_target(self) -> bool:
        fast_enough = min(self.encode_ratio, self.decode_ratio) >= self.case.target
        return fast_enough and self.memory_ratio <= MEMORY_TARGET


def paired_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of every run, taken in turn within each repetition, after one warm-up each.

    Interleaving keeps the copy yardstick and the codec under the same load at the same moment,
    which matters on a shared machine whose speed drifts from second to second.
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def peak_encode_memory(case: Case, x: np.ndarray, rng: np.random.Generator) -> float:
    """Peak bytes allocated while encoding `x`, as a multiple of x.nbytes (output included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        encoded = case.encode(x, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del encoded
    return (peak - before) / x.nbytes


def measure(case: Case, x: np.ndarray, repeats: int) -> Row:
    rng = np.random.default_rng(1)
    encoded = case.encode(x, rng)
    destination = np.empty_like(x)
    times = paired_seconds(
        {
            "copy": lambda: np.copyto(destination, x),
            "encode": lambda: case.encode(x, rng),
            "decode": lambda: decode(encoded),
            # tobytes() writes fresh memory, as every encoder must for its output; where
            # first-touch page faults are dear it is far slower than the warm copy.
            "tobytes": x.tobytes,
        },
        repeats,
    )
    copy = times["copy"]

    def gbs(name: str) -> float:
        return x.nbytes / statistics.median(times[name]) / 1e9

    def ratio(name: str) -> float:
        return statistics.median(c / t for c, t in zip(copy, times[name], strict=True))

    return Row(
        case=case,
        values=x.size,
        encode_gbs=gbs("encode"),
        decode_gbs=gbs("decode"),
        copy_gbs=gbs("copy"),
        encode_ratio=ratio("encode"),
        decode_ratio=ratio("decode"),
        fresh_copy_gbs=gbs("tobytes"),
        memory_ratio=peak_encode_memory(case, x, rng),
    )


def format_table(rows: list[Row]) -> str:
    lines = [
        "| codec | values | encode GB/s | decode GB/s | copy GB/s | encode/copy | decode/copy "
        "| target | peak mem / input | meets target | tobytes GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case.label} | {row.values / 2**20:g}M | {row.encode_gbs:.2f} "
            f"| {row.decode_gbs:.2f} | {row.copy_gbs:.2f} | {row.encode_ratio:.2f} "
            f"| {row.decode_ratio:.2f} | {row.case.target:g} "
            f"| {row.memory_ratio:.2f} | {'yes' if row.meets_target else 'NO'} "
            f"| {row.fresh_copy_gbs:.2f} |"
        )
    return "\n".join(lines)


def back_to_back_copy_gbs(x: np.ndarray, repeats: int) -> float:
    destination = np.empty_like(x)
    copies = paired_seconds({"copy": lambda: np.copyto(destination, x)}, repeats)["copy"]
    return x.nbytes / statistics.median(copies) / 1e9


def run(sizes: list[int], repeats: int) -> tuple[list[Row], dict[int, float]]:
    """Rows for every case and size, and the back-to-back copy GB/s of each size for reference."""
    rows: list[Row] = []
    tight_copy: dict[int, float] = {}
    for size in sizes:
        x = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
        tight_copy[size] = back_to_back_copy_gbs(x, repeats)
        rows.extend(measure(case, x, repeats) for case in CASES)
    return rows, tight_copy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1M values, 3 repetitions")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per figure")
    args = parser.parse_args(argv)
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24]
    repeats = args.repeats or (3 if args.quick else 9)
    rows, tight_copy = run(sizes, repeats)
    print(format_table(rows))
    print()
    for size, gbs in tight_copy.items():
        print(f"np.copyto back to back (no codec in between), {size / 2**20:g}M: {gbs:.2f} GB/s")


if __name__ == "__main__":
    main()

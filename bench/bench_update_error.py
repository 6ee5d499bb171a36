"""Benchmark 1b: how much of a real CNN update each uplink codec loses, per bit.

    python -m bench.bench_update_error --json docs/results/update_error.json

Why: on Fashion-MNIST the bits needed to reach 85 % are set by how many fresh uploads a round
needs and how many bits each costs (docs/benchmarks.md). This measures the second factor on the
updates FLQ actually sends: one worker of the benchmark-1 setup (bench/configs/fmnist-bbit.toml,
the 467,818-parameter CNN, batch 64, one local SGD step) computes its update `u` at the initial
weights and after `--steps` local steps, and the innovation `u2 - u1` between two minibatches at
the same weights (what bbit and bin quantize once a reference exists).

For each codec: payload bits per parameter (headers included) and the relative error
||x - decode(encode(x))||^2 / ||x||^2 summed over the 12 tensors, through flq.codec: the LAQ
grid (bbit's default, one radius per tensor), the block grid (flq_algorithm.bbit_block = N: 0 on
the grid, one float32 radius per N values), sign (bin), laq8's stochastic 8-bit and sparse
ternary (stc/sti: the top p of each tensor as +-mu, Golomb-coded positions). For the sparse code
it also compares the Golomb-Rice bits per kept value with the empirical entropy of the gaps and
signs it codes: what an entropy coder (arithmetic coding of the same gaps) could save at most.
For the grid codes it reports the bits with their indices under bzip2 (flq/codec/lossless.py)
and that stage's CPU time beside the packed encode and both decodes, on the same updates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_accuracy import machine
from flq.codec import Codec, decode, encode, lossless, sparse

Quantizer = Callable[[np.ndarray], tuple[np.ndarray, int]]  # values -> (decoded, wire bits)


def flq_codec(codec: Codec, bits: int, block: int = 256, density: float = 0.01) -> Quantizer:
    """FLQ's codec as bbit/bin/laq8 use it: round to nearest (an rng only where the codec is
    stochastic by definition, laq8)."""
    rng = np.random.default_rng(0) if codec is Codec.STOCHASTIC else None

    def run(values: np.ndarray) -> tuple[np.ndarray, int]:
        encoded = encode(codec, values, bits, rng, block=block, density=density)
        return decode(encoded), encoded.cost_bits()

    return run


QUANTIZERS: dict[str, Quantizer] = {
    "bin (sign, 1 bit)": flq_codec(Codec.SIGN, 1),
    "bbit b=2, LAQ grid": flq_codec(Codec.LAQ_GRID, 2),
    "bbit b=3, LAQ grid": flq_codec(Codec.LAQ_GRID, 3),
    "bbit b=4, LAQ grid": flq_codec(Codec.LAQ_GRID, 4),
    "bbit b=2, block grid 64": flq_codec(Codec.BLOCK_GRID, 2, 64),
    "bbit b=2, block grid 128": flq_codec(Codec.BLOCK_GRID, 2, 128),
    "bbit b=3, block grid 256": flq_codec(Codec.BLOCK_GRID, 3, 256),
    "bbit b=4, block grid 1024": flq_codec(Codec.BLOCK_GRID, 4, 1024),
    "laq8 (stochastic 8 bit)": flq_codec(Codec.STOCHASTIC, 8),
    "sparse ternary p=4 % (smaller code per tensor)": flq_codec(
        Codec.SPARSE_TERNARY, 0, density=0.04
    ),
    "sparse ternary p=1 % (smaller code per tensor)": flq_codec(
        Codec.SPARSE_TERNARY, 0, density=0.01
    ),
    "sparse ternary p=0.25 % (smaller code per tensor)": flq_codec(
        Codec.SPARSE_TERNARY, 0, density=0.0025
    ),
}
DENSITIES = (0.04, 0.01, 0.0025)
# The grid codecs whose indices go under bzip2 where smaller (flq/codec/lossless.py); the
# 8-bit LAQ grid is the downlink's codec.
LOSSLESS: dict[str, tuple[Codec, int, int]] = {
    "bbit b=3, block grid 256": (Codec.BLOCK_GRID, 3, 256),
    "bbit b=4, block grid 1024": (Codec.BLOCK_GRID, 4, 1024),
    "LAQ grid b=8 (downlink)": (Codec.LAQ_GRID, 8, 0),
}


def lossless_bits(codec: Codec, bits: int, block: int, tensors: list[np.ndarray]) -> float:
    """Bits per parameter (headers included) of the grid code with its indices under bzip2
    where that is smaller, checked to decode to the same values as the packed code."""
    total = 0
    for values in tensors:
        packed = encode(codec, values, bits, block=block or 256)
        sent = lossless.smaller(packed)
        if not np.array_equal(decode(sent), decode(packed)):
            raise AssertionError(f"{codec.name}: the bzip2 form decodes differently")
        total += sent.cost_bits()
    return total / sum(v.size for v in tensors)


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    """Median CPU time of `work` (this process's, not the wall clock: the box is shared)."""
    took = []
    for _ in range(repeats):
        began = time.process_time()
        work()
        took.append(time.process_time() - began)
    return 1e3 * float(np.median(took))


def lossless_ms(
    codec: Codec, bits: int, block: int, tensors: list[np.ndarray], repeats: int = 5
) -> dict[str, float]:
    """CPU cost of the bzip2 stage on one whole update, medians of `repeats` in milliseconds:
    the packed encode it follows, the stage itself, and decoding either form."""
    packed = [encode(codec, values, bits, block=block or 256) for values in tensors]
    sent = [lossless.smaller(p) for p in packed]
    return {
        "encode_packed_ms": _median_ms(
            lambda: [encode(codec, v, bits, block=block or 256) for v in tensors], repeats
        ),
        "bzip2_stage_ms": _median_ms(lambda: [lossless.smaller(p) for p in packed], repeats),
        "decode_packed_ms": _median_ms(lambda: [decode(p) for p in packed], repeats),
        "decode_bzip2_ms": _median_ms(lambda: [decode(p) for p in sent], repeats),
    }


def _entropy_bits(symbols: np.ndarray) -> float:
    """Total bits of the plug-in (empirical) entropy code of `symbols`."""
    if not symbols.size:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    shares = counts / symbols.size
    return float(-(counts * np.log2(shares)).sum())


def class_code_bits(gaps: np.ndarray) -> float:
    """Bits of an achievable adaptive code of the gaps: each gap's Elias-gamma class
    c = floor(log2(gap + 1)) entropy-coded with the tensor's own class histogram (sent as 16
    bits per class up to the largest), then the c bits below the class's leading one, raw."""
    if not gaps.size:
        return 0.0
    classes = np.floor(np.log2(gaps + 1.0)).astype(np.int64)
    return _entropy_bits(classes) + float(classes.sum()) + 16.0 * (int(classes.max()) + 1)


def position_code(tensors: list[np.ndarray], density: float) -> dict[str, float]:
    """Per kept value: Golomb-Rice bits (positions + sign, as sent); an adaptive class code of
    the same gaps (achievable, class_code_bits) plus one bit a sign; and the plug-in entropy of
    the gaps and signs (optimistic: the histogram itself is free and small counts flatter it)."""
    golomb = entropy = classes = kept = 0.0
    for tensor in tensors:
        decoded = decode(encode(Codec.SPARSE_TERNARY, tensor, 0, density=density)).reshape(-1)
        positions = np.flatnonzero(decoded)
        positive = decoded[positions] > 0
        nnz = positions.size
        golomb += sparse.coded_bits(positions, sparse.rice_bits(nnz / tensor.size))
        gaps = np.diff(positions, prepend=-1) - 1
        entropy += _entropy_bits(gaps) + _entropy_bits(positive)
        classes += class_code_bits(gaps) + nnz
        kept += nnz
    return {
        "golomb_bits_per_kept": golomb / kept,
        "class_code_bits_per_kept": classes / kept,
        "entropy_bits_per_kept": entropy / kept,
    }


def relative_error(quantizer: Quantizer, tensors: list[np.ndarray]) -> tuple[float, float]:
    """(bits per parameter on the wire, summed squared error / summed squared norm)."""
    error = norm = 0.0
    wire_bits = values = 0
    for tensor in tensors:
        decoded, bits = quantizer(tensor)
        diff = tensor.astype(np.float64) - decoded
        error += float(np.dot(diff.ravel(), diff.ravel()))
        norm += float(np.dot(tensor.ravel().astype(np.float64), tensor.ravel()))
        wire_bits += bits
        values += tensor.size
    return wire_bits / values, error / norm


def real_updates(steps: int) -> dict[str, list[np.ndarray]]:
    """Updates of worker w3 of the benchmark-1 setup: at init, after `steps`, and an innovation."""
    from flq.config import load_config
    from flq.types import TrainSpec
    from flq.worker.training import build_trainer

    cfg = load_config(Path(__file__).parent / "configs" / "fmnist-bbit.toml")
    built, _ = build_trainer(cfg, "w3", 3)
    spec = TrainSpec(local_steps=1, batch_size=cfg.dataset.batch_size, lr=cfg.model.lr)
    weights = built.trainer.initial_weights()
    first = built.train(weights, spec).delta
    second = built.train(weights, spec).delta
    for _ in range(steps):
        delta = built.train(weights, spec).delta
        weights = [w + d for w, d in zip(weights, delta, strict=True)]
    return {
        "update at init": first,
        "innovation at init (two minibatches)": [b - a for a, b in zip(first, second, strict=True)],
        f"update after {steps} local steps": built.train(weights, spec).delta,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="local steps before the 3rd input")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    inputs = real_updates(args.steps)
    rows: list[dict[str, Any]] = []
    header = "| codec | bits/param | " + " | ".join(f"rel. error: {n}" for n in inputs) + " |"
    print(header)
    print("|---|---:|" + "---:|" * len(inputs))
    for name, quantizer in QUANTIZERS.items():
        cells = {label: relative_error(quantizer, tensors) for label, tensors in inputs.items()}
        bits = next(iter(cells.values()))[0]
        rows.append({"codec": name, "bits_per_param": bits, **{k: v[1] for k, v in cells.items()}})
        errors = " | ".join(f"{v[1]:.3f}" for v in cells.values())
        print(f"| {name} | {bits:.3f} | {errors} |")
    print()
    print("| grid code, bits/param | " + " | ".join(inputs) + " |")
    print("|---|" + "---:|" * len(inputs))
    compressed = []
    for name, (codec, bits, block) in LOSSLESS.items():
        per_input = {label: lossless_bits(codec, bits, block, t) for label, t in inputs.items()}
        compressed.append({"codec": f"{name} + bzip2", **per_input})
        print(f"| {name} + bzip2 | " + " | ".join(f"{v:.3f}" for v in per_input.values()) + " |")
    print()
    print("CPU time per whole update (ms, median of 5, this machine):")
    print("| grid code | input | packed encode | bzip2 stage | decode packed | decode bzip2 |")
    print("|---|---|---:|---:|---:|---:|")
    timings = []
    for name, (codec, bits, block) in LOSSLESS.items():
        for label, tensors in inputs.items():
            ms = lossless_ms(codec, bits, block, tensors)
            timings.append({"codec": name, "input": label, **ms})
            print(f"| {name} | {label} | " + " | ".join(f"{v:.1f}" for v in ms.values()) + " |")
    print()
    print(
        "| input | p | Golomb-Rice bits per kept value | adaptive class code | "
        "plug-in gap + sign entropy | formula |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    codes = []
    for label, tensors in inputs.items():
        for density in DENSITIES:
            code = position_code(tensors, density)
            formula = sparse.expected_bits_per_nonzero(density)
            codes.append({"input": label, "density": density, **code, "formula": formula})
            print(
                f"| {label} | {density:g} | {code['golomb_bits_per_kept']:.2f} | "
                f"{code['class_code_bits_per_kept']:.2f} | "
                f"{code['entropy_bits_per_kept']:.2f} | {formula:.2f} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine(),
            "steps": args.steps,
            "rows": rows,
            "lossless": compressed,
            "lossless_ms": timings,
            "codes": codes,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

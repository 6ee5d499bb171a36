"""Benchmark 2: FLQ's codecs beside what users use today, in one run, as ratios.

    .venv-bench/bin/python -m bench.bench_compare            # make bench-compare builds the venv
    .venv-bench/bin/python -m bench.bench_compare --quick

Baselines:
- Flower's float32 serialization: `np.save` of the array into a BytesIO (flwr.common's
  ndarray_to_bytes) and `np.load` back (bytes_to_ndarray); reimplemented here in its two lines.
- hivemind's 8-bit quantizer, `hivemind.compression.Uniform8BitQuantization` (compress to its wire
  message, extract back), imported from the real package when it installs: it needs torch, which
  lives only in the bench venv (.venv-bench), never in FLQ's dependencies. If hivemind cannot be
  imported, a faithful reimplementation of its scheme is measured instead and labelled so.

For each codec: encode and decode time (median of interleaved repetitions on the same input),
bytes on the wire per parameter, relative L2 error, and the ratios to Flower's float32 in the same
run. Inputs: one 1M-value tensor, and the CNN's 12 tensors (467,818 values) as a model travels.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flq.codec import Codec, decode, encode

CNN_SHAPES = [
    (3, 3, 1, 32), (32,), (3, 3, 32, 32), (32,), (3, 3, 32, 64), (64,), (3, 3, 64, 64), (64,),
    (3136, 128), (128,), (128, 10), (10,),
]  # fmt: skip
INPUTS = {"1M tensor": [(1_000_000,)], "CNN (12 tensors)": CNN_SHAPES}


@dataclass
class Row:
    name: str
    input: str
    values: int
    encode_ms: float
    decode_ms: float
    bytes_per_value: float
    rel_error: float
    encode_vs_flower: float = math.nan  # Flower's encode time / this encode time (>1 = faster)
    decode_vs_flower: float = math.nan
    bytes_vs_flower: float = math.nan  # this size / Flower's size
    note: str = ""


Model = list[np.ndarray]
Codec_ = tuple[Callable[[Model], Any], Callable[[Any], Model], Callable[[Any], int]]


# ---------------------------------------------------------------- the codecs


def flower_float32() -> Codec_:
    def enc(model: Model) -> list[bytes]:
        out = []
        for array in model:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            out.append(buffer.getvalue())
        return out

    def dec(blobs: list[bytes]) -> Model:
        return [np.load(io.BytesIO(b), allow_pickle=False) for b in blobs]

    return enc, dec, lambda blobs: sum(len(b) for b in blobs)


def flq_codec(codec: Codec, bits: int) -> Codec_:
    rng = np.random.default_rng(0)

    def enc(model: Model) -> list[Any]:
        return [encode(codec, x, bits, rng if codec == Codec.STOCHASTIC else None) for x in model]

    def dec(encoded: list[Any]) -> Model:
        return [decode(e) for e in encoded]

    # cost_bits: packed payload plus the tensor header, what FLQ counts as on the wire.
    return enc, dec, lambda encoded: sum(math.ceil(e.cost_bits() / 8) for e in encoded)


def import_hivemind() -> tuple[Any, str]:
    """hivemind.compression without running hivemind/__init__.py, which imports its P2P stack
    (installed with --no-deps, so those dependencies are absent). Returns (module, note)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("hivemind")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("hivemind is not installed")
    package = types.ModuleType("hivemind")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["hivemind"] = package
    import hivemind.compression as compression

    version = "?"
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("hivemind")
    except Exception:  # the version is decoration
        pass
    return compression, f"hivemind {version}, real package"


def hivemind_8bit() -> tuple[Codec_, str]:
    import torch

    try:
        compression, note = import_hivemind()
        quantizer = compression.Uniform8BitQuantization()
        info_for = compression.CompressionInfo.from_tensor

        def enc(model: Model) -> list[Any]:
            out = []
            for x in model:
                tensor = torch.from_numpy(x)
                out.append(quantizer.compress(tensor, info_for(tensor)))
            return out

        def dec(messages: list[Any]) -> Model:
            return [quantizer.extract(m).numpy() for m in messages]

        note += " (imported without its P2P stack; numpy < 2.4 in the bench venv, as it needs)"
        return (enc, dec, lambda messages: sum(m.ByteSize() for m in messages)), note
    except Exception as error:  # fall back, and say why
        return reimplemented_uniform_8bit(torch), (
            f"REIMPLEMENTATION of hivemind's Uniform8BitQuantization (hivemind would not "
            f"import: {type(error).__name__}: {error})"
        )


def reimplemented_uniform_8bit(torch: Any) -> Codec_:
    """hivemind 1.1's Uniform8BitQuantization, step for step: centre on the mean, bins of
    6 sigma / 256, torch.quantize_per_tensor to uint8, a 256-entry codebook of bucket means; on the
    wire an int64 codebook size, the float32 codebook and the uint8 indices."""
    n_bins, range_in_sigmas = 256, 6

    def quantize(x: Any) -> tuple[np.ndarray, np.ndarray]:
        shift = x.mean()
        centered = x - shift
        std = centered.norm() / math.sqrt(centered.numel() - 1)
        scale = range_in_sigmas * std / n_bins
        indices = torch.quantize_per_tensor(centered, scale, n_bins // 2, torch.quint8).int_repr()
        sums = torch.zeros(n_bins).scatter_add_(0, indices.flatten().long(), x.flatten())
        counts = torch.clamp_min_(torch.bincount(indices.flatten(), minlength=n_bins), 1)
        return indices.numpy().astype(np.uint8), (sums / counts).numpy().astype(np.float32)

    def enc(model: Model) -> list[tuple[bytes, tuple[int, ...]]]:
        out = []
        for x in model:
            indices, codebook = quantize(torch.from_numpy(x))
            buffer = b"".join(
                (np.int64(len(codebook)).tobytes(), codebook.tobytes(), indices.tobytes())
            )
            out.append((buffer, x.shape))
        return out

    def dec(messages: list[tuple[bytes, tuple[int, ...]]]) -> Model:
        out = []
        for buffer, shape in messages:
            size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
            codebook = np.frombuffer(buffer, offset=8, count=size, dtype=np.float32)
            indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=np.uint8)
            out.append(codebook[indices.astype(np.int64)].reshape(shape))
        return out

    # + ~20 bytes of protobuf fields (shape, dtype, compression) per tensor, as hivemind sends
    return enc, dec, lambda messages: sum(len(b) + 20 for b, _ in messages)


_HIVEMIND: list[tuple[Codec_, str]] = []  # imported once per process


def codecs(with_hivemind: bool) -> list[tuple[str, Codec_, str]]:
    rows: list[tuple[str, Codec_, str]] = [
        ("Flower float32 (np.save)", flower_float32(), "flwr.common.ndarray_to_bytes, inline"),
        ("FLQ float32", flq_codec(Codec.FLOAT32, 32), ""),
        ("FLQ laq8 (stochastic 8-bit)", flq_codec(Codec.STOCHASTIC, 8), ""),
        ("FLQ bbit b=4 (LAQ grid)", flq_codec(Codec.LAQ_GRID, 4), ""),
        ("FLQ bbit b=2 (LAQ grid)", flq_codec(Codec.LAQ_GRID, 2), ""),
        ("FLQ bin (sign, 1 bit)", flq_codec(Codec.SIGN, 1), ""),
    ]
    if with_hivemind:
        try:
            if not _HIVEMIND:
                _HIVEMIND.append(hivemind_8bit())
            codec, note = _HIVEMIND[0]
            rows.insert(1, ("hivemind Uniform8Bit", codec, note))
        except ImportError as error:
            print(f"torch is not importable here ({error}): hivemind row left out", flush=True)
    return rows


# ---------------------------------------------------------------- measuring


def measure_all(model: Model, label: str, repeats: int, with_hivemind: bool) -> list[Row]:
    table = codecs(with_hivemind)
    encoded = {name: enc(model) for name, (enc, _, _), _ in table}
    runs: dict[str, Callable[[], object]] = {}
    for name, (enc, dec, _), _ in table:
        runs[f"{name}/enc"] = lambda enc=enc: enc(model)
        runs[f"{name}/dec"] = lambda dec=dec, name=name: dec(encoded[name])
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):  # interleaved: every codec sees the same machine load
        for key, run in runs.items():
            began = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - began)
    values = sum(x.size for x in model)
    flat = np.concatenate([x.ravel() for x in model]).astype(np.float64)
    rows = []
    for name, (_, dec, size), note in table:
        back = np.concatenate([np.asarray(x, np.float64).ravel() for x in dec(encoded[name])])
        rows.append(
            Row(
                name=name,
                input=label,
                values=values,
                encode_ms=statistics.median(times[f"{name}/enc"]) * 1e3,
                decode_ms=statistics.median(times[f"{name}/dec"]) * 1e3,
                bytes_per_value=size(encoded[name]) / values,
                rel_error=float(np.linalg.norm(back - flat) / np.linalg.norm(flat)),
                note=note,
            )
        )
    base = rows[0]
    for row in rows:
        row.encode_vs_flower = base.encode_ms / row.encode_ms
        row.decode_vs_flower = base.decode_ms / row.decode_ms
        row.bytes_vs_flower = row.bytes_per_value / base.bytes_per_value
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| input | codec | encode (ms) | decode (ms) | bytes/value | rel. L2 error "
        "| encode speed vs Flower | decode speed vs Flower | size vs Flower |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.input} | {r.name} | {r.encode_ms:.2f} | {r.decode_ms:.2f} | "
            f"{r.bytes_per_value:.3f} | {r.rel_error:.3g} | {r.encode_vs_flower:.2f}x | "
            f"{r.decode_vs_flower:.2f}x | {r.bytes_vs_flower:.3f} |"
        )
    return "\n".join(lines)


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-hivemind", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 21
    rng = np.random.default_rng(42)
    rows: list[Row] = []
    for label, shapes in INPUTS.items():
        # Update-like values: zero-mean Gaussian, small. (Heavier tails raise the error of every
        # max-scaled grid, FLQ's LAQ grid included; bbit quantizes innovations, not raw values.)
        model = [(rng.standard_normal(size=s) * 1e-3).astype(np.float32) for s in shapes]
        rows += measure_all(model, label, repeats, not args.no_hivemind)
    notes = sorted({r.note for r in rows if r.note})
    print(markdown(rows))
    for note in notes:
        print(f"- {note}")
    if args.json:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "machine": {
                        "nproc": os.cpu_count(),
                        "memory_gib": round(pages / 2**30, 1),
                        "date": time.strftime("%Y-%m-%d", time.gmtime()),
                        "numpy": np.__version__,
                        "torch_threads": _torch_threads(),
                    },
                    "repeats": repeats,
                    "rows": [asdict(r) for r in rows],
                },
                handle,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

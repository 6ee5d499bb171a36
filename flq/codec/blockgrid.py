"""The block grid: a symmetric grid with 0 on it and one radius per block of values.

    L = 2^(b-1) - 1 levels each side of 0 (b=2: {-R, 0, R}; b=4: 15 levels), per block j of
    `block` consecutive values (the last may be shorter): R_j = max |v| over the block,
    q = round(v * L / R_j) in [-L, L], sent as q + L in b bits; decode q * R_j / L.
    |error| <= R_j / (2L) per value (round to nearest); with an rng, stochastic rounding
    (unbiased) on the same levels.

Why it exists beside the LAQ grid (one R per tensor, 2^b levels, 0 not on the grid): a CNN update
is heavy-tailed, so one radius per tensor puts most values within one step of 0, and the LAQ grid
cannot send 0 — at b = 2 it reconstructs an update with more error than the update's own energy.
Per-block radii and a level at 0 cut the error 3-25x at the same bits on real updates
(bench/bench_update_error.py, docs/benchmarks.md).

Payload: the block radii as little-endian float32, then the packed indices (flq.codec.bitpack's
bit order). The block size travels as the tensor's one scale.
"""

from __future__ import annotations

import math

import numpy as np

from flq.codec.bitpack import pack_bits, packed_size, unpack_bits
from flq.codec.errors import CodecError

MIN_BITS = 2  # one bit would leave no level but 0
MAX_BLOCK = 1 << 24
RADIUS_BYTES = 4
_RADIUS_DTYPE = np.dtype("<f4")
# Rows of blocks quantized at a time, so temporaries stay near this many values.
_ROWS_VALUES = 1 << 17


def levels(bits: int) -> int:
    """L: the number of nonzero levels on each side of 0."""
    return (1 << (bits - 1)) - 1


def block_count(count: int, block: int) -> int:
    return -(-count // block)


def payload_size(count: int, bits: int, block: int) -> int:
    """Bytes of the payload: one float32 radius per block, then count values of `bits` bits."""
    return RADIUS_BYTES * block_count(count, block) + packed_size(count, bits)


def check_block(block: object) -> int:
    """The block size as an int; CodecError naming the field unless it is 1..MAX_BLOCK."""
    if isinstance(block, bool) or not isinstance(block, (int, float, np.integer, np.floating)):
        raise CodecError(f"scales[block]: got {block!r}, expected an int in 1..{MAX_BLOCK}")
    if not (math.isfinite(block) and float(block).is_integer() and 1 <= block <= MAX_BLOCK):
        raise CodecError(f"scales[block]: got {block!r}, expected an int in 1..{MAX_BLOCK}")
    return int(block)


def encode(flat: np.ndarray, bits: int, block: int, rng: np.random.Generator | None) -> bytes:
    """Payload for `flat` (1-D float32, finite)."""
    nblocks = block_count(flat.size, block)
    radii = np.zeros(nblocks, dtype=_RADIUS_DTYPE)
    indices = np.empty(flat.size, dtype=np.uint8 if bits <= 8 else np.uint16)
    rows_per_pass = max(1, _ROWS_VALUES // block)
    for first in range(0, nblocks, rows_per_pass):
        last = min(first + rows_per_pass, nblocks)
        start, stop = first * block, min(last * block, flat.size)
        indices[start:stop] = _quantize_rows(flat[start:stop], bits, block, rng, radii[first:last])
    return radii.tobytes() + pack_bits(indices, bits)


def _quantize_rows(
    values: np.ndarray,
    bits: int,
    block: int,
    rng: np.random.Generator | None,
    radii_out: np.ndarray,
) -> np.ndarray:
    """Indices q + L for consecutive whole blocks (the last may be short); fills radii_out."""
    top = levels(bits)
    whole = values.size // block * block
    rows = [values[:whole].reshape(-1, block)] if whole else []
    if whole < values.size:
        rows.append(values[whole:].reshape(1, -1))
    out = []
    row_index = 0
    for matrix in rows:
        radius = np.abs(matrix).max(axis=1)
        radii_out[row_index : row_index + radius.size] = radius
        row_index += radius.size
        # A zero block quantizes to index L (the value 0); 1/R is computed only where R > 0.
        per_level = np.divide(top, radius, out=np.zeros_like(radius), where=radius > 0)
        t = matrix * per_level[:, np.newaxis]
        if rng is None:
            np.rint(t, out=t)
        else:
            t += rng.random(t.shape, dtype=np.float32)
            np.floor(t, out=t)
        np.clip(t, -top, top, out=t)  # float32 rounding may land a hair past the end
        t += top
        out.append(t.reshape(-1))
    return np.concatenate(out) if len(out) > 1 else out[0]


def check_payload(data: bytes, bits: int, count: int, block: int) -> None:
    """CodecError naming the field unless `data` is a well-formed payload: its length, finite
    non-negative radii that fit float32, and every index within 0..2L."""
    expected = payload_size(count, bits, block)
    if len(data) != expected:
        nblocks = block_count(count, block)
        raise CodecError(
            f"payload length: got {len(data)} bytes, expected {expected} "
            f"(= {nblocks} block radii * {RADIUS_BYTES} + {count} values * {bits} bits packed)"
        )
    radii = _radii(data, count, block)
    if radii.size and not (math.isfinite(radii.max()) and math.isfinite(radii.min())):
        raise CodecError("payload radii: got NaN or Inf, expected finite float32 magnitudes")
    if radii.size and radii.min() < 0:
        raise CodecError(f"payload radii: got {float(radii.min())!r}, expected >= 0")
    if count:
        highest = int(_indices(data, bits, count, block).max())
        if highest > 2 * levels(bits):
            raise CodecError(
                f"payload values: got index {highest}, expected 0..{2 * levels(bits)} "
                f"for {bits}-bit block grid"
            )


def decode(data: bytes, bits: int, count: int, block: int) -> np.ndarray:
    """The float32 values a checked payload stands for: (index - L) * R_j / L."""
    top = levels(bits)
    radii = _radii(data, count, block)
    steps = radii / np.float32(top)
    values = _indices(data, bits, count, block).astype(np.float32)
    values -= np.float32(top)
    whole = count // block * block
    values[:whole].reshape(-1, block)[...] *= steps[: whole // block, np.newaxis]
    if whole < count:
        values[whole:] *= steps[-1]
    return values


def _radii(data: bytes, count: int, block: int) -> np.ndarray:
    nblocks = block_count(count, block)
    return np.frombuffer(data, dtype=_RADIUS_DTYPE, count=nblocks)


def _indices(data: bytes, bits: int, count: int, block: int) -> np.ndarray:
    offset = RADIUS_BYTES * block_count(count, block)
    return unpack_bits(memoryview(data)[offset:], bits, count)

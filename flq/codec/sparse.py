"""Sparse ternary tensors: a few positions, each +mu or -mu, positions Golomb-coded.

After Sattler, Wiedemann, Mueller, Samek, "Robust and Communication-Efficient Federated Learning
from Non-IID Data" (arXiv 1903.02891), section IV: the nonzero positions of a tensor of density
p are roughly a Bernoulli(p) process, so the gaps between them are geometric and a Golomb code
with M = 2^b is near the entropy. The optimal b for density p is

    b* = 1 + floor(log2(log(phi - 1) / log(1 - p))),   phi = (1 + sqrt 5) / 2    (0 when p >= 0.38)

and a gap costs on average b* + 1/(1 - (1 - p)^(2^b*)) bits, plus one bit for the sign.

Payload, one codeword per nonzero in increasing position order, bits written least significant
first into bytes (bit k of the stream is bit k % 8 of byte k // 8, as in flq.codec.bitpack):

    gap d = position - previous position - 1 (the first: the position itself), q = d >> b:
    q one-bits, a zero-bit, the low b bits of d (least significant first), the sign (1 = +mu).

The stream is padded with zero bits to a whole byte. Header: bits = b, scales = (mu, nnz).
Decoding checks that exactly nnz codewords fill the payload, every position lies inside the
tensor, and the padding is zero, so a malformed payload is an error, never a wrong tensor.
"""

from __future__ import annotations

import math

import numpy as np

from flq.codec import gapclass
from flq.codec.errors import CodecError
from flq.codec.tensor import Codec, EncodedTensor

MAX_RICE_BITS = 24  # gaps up to 2^24 per remainder; larger tensors just use more unary bits
_PHI = (1 + math.sqrt(5)) / 2
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_NNZ = 1 << 24  # nnz travels as a float32 scale: exact up to 2^24


def rice_bits(density: float) -> int:
    """b*: the Golomb-Rice parameter (M = 2^b) that codes gaps of a density-p process best."""
    if not 0.0 < density < 1.0:
        return 0
    ratio = math.log(_PHI - 1) / math.log(1 - density)
    if ratio < 1.0:
        return 0
    return min(MAX_RICE_BITS, 1 + math.floor(math.log2(ratio)))


def expected_bits_per_nonzero(density: float) -> float:
    """Mean bits a position plus its sign cost at the optimal parameter (the paper's formula)."""
    b = rice_bits(density)
    return b + 1 / (1 - (1 - density) ** (1 << b)) + 1


def coded_bits(positions: np.ndarray, b: int) -> int:
    """Exact bits of the codewords for sorted `positions` with parameter b (no padding)."""
    gaps = _gaps(positions)
    return int((gaps >> b).sum()) + gaps.size * (b + 2)


def encode_positions(positions: np.ndarray, positive: np.ndarray, b: int) -> bytes:
    """The payload for strictly increasing `positions` with signs `positive` (bool)."""
    gaps = _gaps(positions)
    count = gaps.size
    if not count:
        return b""
    quotients = gaps >> b
    lengths = quotients + (b + 2)
    starts = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    total = int(starts[-1] + lengths[-1])
    stream = np.zeros(-(-total // 8) * 8, dtype=np.uint8)
    _set_unary(stream, starts, quotients)
    fixed = starts + quotients + 1  # first bit after the unary terminator
    for bit in range(b):
        stream[fixed + bit] = (gaps >> bit) & 1
    stream[fixed + b] = positive
    return np.packbits(stream, bitorder="little").tobytes()


def decode_positions(data: bytes, b: int, nnz: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, positive) from a payload; CodecError unless it is exactly nnz codewords of
    positions inside 0..count-1 followed by zero padding."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if nnz == 0:
        if stream.size:
            raise CodecError(f"payload length: got {len(data)} bytes, expected 0 for nnz = 0")
        return np.zeros(0, np.int64), np.zeros(0, bool)
    fixed = _codeword_tails(stream, b, nnz)
    used = int(fixed[-1]) + b + 1
    if -(-used // 8) != len(data) or stream[used:].any():
        raise CodecError(
            f"payload length: got {len(data)} bytes, expected {-(-used // 8)} "
            f"(= {used} bits of {nnz} codewords, zero-padded)"
        )
    weights = np.left_shift(1, np.arange(b, dtype=np.int64))
    low = stream[fixed[:, None] + np.arange(b)] @ weights if b else np.zeros(nnz, np.int64)
    unary_starts = np.concatenate(([0], fixed[:-1] + b + 1))
    gaps = ((fixed - 1 - unary_starts) << b) + low
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= count:
        raise CodecError(f"payload positions: got {int(positions[-1])}, expected < {count}")
    return positions, stream[fixed + b].astype(bool)


def max_payload_bytes(b: int, nnz: int, count: int) -> int:
    """Bytes nnz codewords can take at most in a tensor of `count` values: the unary parts sum
    to at most (count - nnz) >> b ones, each codeword adds b + 2 bits."""
    if nnz > count:
        return 0
    return -(-(((count - nnz) >> b) + nnz * (b + 2)) // 8)


def check_header(scales: tuple[float, ...], count: int) -> tuple[float, int]:
    """(mu, nnz) from the scales; CodecError naming the field unless both are valid."""
    if len(scales) != 2:
        raise CodecError(
            f"scales: got {len(scales)} values, expected 2 (['mu', 'nnz']) for SPARSE_TERNARY"
        )
    mu, nnz = scales
    if not isinstance(mu, (int, float, np.floating, np.integer)) or not math.isfinite(mu):
        raise CodecError(f"scales[mu]: got {mu!r}, expected a finite number")
    if not 0 <= mu <= _FLOAT32_MAX:
        raise CodecError(f"scales[mu]: got {mu!r}, expected a magnitude that fits float32")
    limit = min(count, _MAX_NNZ)
    if not (
        isinstance(nnz, (int, float, np.floating, np.integer))
        and math.isfinite(nnz)
        and float(nnz).is_integer()
        and 0 <= nnz <= limit
    ):
        raise CodecError(f"scales[nnz]: got {nnz!r}, expected an int in 0..{limit}")
    return float(mu), int(nnz)


def _gaps(positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions[0] < 0 or np.any(np.diff(positions) <= 0)):
        raise CodecError("positions: expected strictly increasing values >= 0")
    return np.diff(positions, prepend=-1) - 1


def _set_unary(stream: np.ndarray, starts: np.ndarray, quotients: np.ndarray) -> None:
    """Set quotients[i] one-bits from starts[i] (the terminating zero is already there)."""
    ones = int(quotients.sum())
    if not ones:
        return
    owner_start = np.repeat(starts, quotients)
    first_of_owner = np.repeat(np.cumsum(quotients) - quotients, quotients)
    stream[owner_start + np.arange(ones) - first_of_owner] = 1


def _codeword_tails(stream: np.ndarray, b: int, nnz: int) -> np.ndarray:
    """Index of the first bit after each codeword's unary terminator, for nnz codewords.

    A codeword starting at bit k ends its unary part at the first zero at or after k, and the
    next codeword starts b + 1 bits after that: next(k) = next_zero(k) + b + 2. The starts are
    0, next(0), next(next(0)), ...; pointer doubling finds nnz of them in log2(nnz) vectorised
    steps (each doubles the starts known and squares the jump table) instead of a walk.
    """
    size = stream.size
    invalid = size + 1  # "no codeword can start here"; maps to itself
    zero_at = np.where(stream == 0, np.arange(size), size)
    next_zero = np.append(np.minimum.accumulate(zero_at[::-1])[::-1], [size, size])
    jump = np.minimum(next_zero + (b + 2), invalid)
    jump[next_zero >= size] = invalid
    starts = np.zeros(1, dtype=np.int64)
    while starts.size < nnz:
        starts = np.concatenate((starts, jump[starts]))
        jump = jump[jump]
    starts = starts[:nnz]
    bad = np.flatnonzero(starts >= size)
    if bad.size:
        raise CodecError(f"payload: ends inside codeword {int(bad[0])} of {nnz}")
    tails = next_zero[starts] + 1
    if tails[-1] + b + 1 > size:
        raise CodecError(f"payload: ends inside codeword {nnz - 1} of {nnz}")
    return tails


# ---------------------------------------------------------------- tensors


def top_k(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest `magnitudes` (1-D), zeros left out: a partition, O(n),
    not a sort; only the k winners are sorted (by position, for the gap code)."""
    k = min(k, magnitudes.size)
    if k <= 0:
        return np.zeros(0, np.int64)
    chosen = np.argpartition(magnitudes, magnitudes.size - k)[magnitudes.size - k :]
    chosen = chosen[magnitudes[chosen] > 0]
    chosen.sort()
    return chosen.astype(np.int64)


def ternary_tensor(
    shape: tuple[int, ...],
    positions: np.ndarray,
    positive: np.ndarray,
    mu: float,
    gap_classes: bool = True,
) -> EncodedTensor:
    """The tensor that is +-mu at `positions` (sorted) and 0 elsewhere: SPARSE_TERNARY
    (Golomb-Rice), or SPARSE_TERNARY_GAPCLASS where allowed and smaller."""
    count = math.prod(shape)
    nnz = int(positions.size)
    if nnz > min(count, _MAX_NNZ):
        raise CodecError(f"nnz: got {nnz}, expected at most {min(count, _MAX_NNZ)}")
    mu32 = float(np.float32(mu))
    if not math.isfinite(mu32) or mu32 < 0:
        raise CodecError(f"mu: got {mu!r}, expected a finite magnitude that fits float32")
    scales = (mu32, float(nnz))
    b = rice_bits(nnz / count) if count else 0
    class_bits = gapclass.plan(_gaps(positions))[2] if gap_classes else math.inf
    if -(-class_bits // 8) < -(-coded_bits(positions, b) // 8):  # the smaller code is sent
        data, classes = gapclass.encode(_gaps(positions), positive)
        return EncodedTensor(Codec.SPARSE_TERNARY_GAPCLASS, tuple(shape), classes, scales, data)
    data = encode_positions(positions, positive, b)
    return EncodedTensor(Codec.SPARSE_TERNARY, tuple(shape), b, scales, data)


def encode_sparse_ternary(x: np.ndarray, density: float) -> EncodedTensor:
    """STC on one tensor: the top max(1, round(p*n)) values by magnitude become +-mu, mu their
    mean magnitude; everything else becomes 0."""
    check_density(density)
    values = np.asarray(x, dtype=np.float32)
    flat = values.reshape(-1)
    if not np.isfinite(flat).all():
        raise CodecError("input: contains NaN or Inf, expected finite values")
    return ternary_top(values, keep_count(flat.size, density))


def ternary_top(values: np.ndarray, count: int, gap_classes: bool = True) -> EncodedTensor:
    """The tensor whose top `count` values by magnitude become +-mu (mu their mean magnitude),
    everything else 0; `values` are float32 and finite (the caller's check)."""
    flat = values.reshape(-1)
    positions = top_k(np.abs(flat), count)
    picked = flat[positions]
    mu = float(np.abs(picked).mean(dtype=np.float64)) if picked.size else 0.0
    return ternary_tensor(values.shape, positions, picked > 0, mu, gap_classes)


def keep_count(count: int, density: float) -> int:
    """k = max(1, round(p * n)) values kept of n (0 for an empty tensor)."""
    return min(count, max(1, round(density * count))) if count else 0


def check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise CodecError(f"density: got {density!r}, expected 0 < p <= 1")


def decode_ternary(enc: EncodedTensor) -> np.ndarray:
    """Flat float32: +-mu at the coded positions, 0 elsewhere (checks the payload as it parses)."""
    mu, nnz = check_header(enc.scales, enc.size)
    positions, positive = _positions_of(enc, nnz)
    out = np.zeros(enc.size, dtype=np.float32)
    mu32 = np.float32(mu)
    out[positions] = np.where(positive, mu32, -mu32)
    return out


def check_ternary(enc: EncodedTensor) -> None:
    _, nnz = check_header(enc.scales, enc.size)
    _positions_of(enc, nnz)


def _positions_of(enc: EncodedTensor, nnz: int) -> tuple[np.ndarray, np.ndarray]:
    if enc.codec == Codec.SPARSE_TERNARY:
        return decode_positions(enc.data, enc.bits, nnz, enc.size)
    gaps, positive = gapclass.decode(enc.data, enc.bits, nnz)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= enc.size:
        raise CodecError(f"payload positions: got {int(positions[-1])}, expected < {enc.size}")
    return positions, positive


def max_ternary_bytes(bits: int, count: int, scales: tuple[float, ...]) -> int:
    _, nnz = check_header(scales, count)
    return max_payload_bytes(bits, nnz, count)


def max_gapclass_bytes(bits: int, count: int, scales: tuple[float, ...]) -> int:
    _, nnz = check_header(scales, count)
    return gapclass.max_payload_bytes(bits, nnz)

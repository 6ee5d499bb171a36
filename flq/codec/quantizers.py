"""Quantizers: float tensors <-> EncodedTensor {codec, shape, bits, scales, packed bytes}.

The encoders and decoders of the dense codecs; flq/codec/registry.py ties each codec's encode,
decode, size and validation rule together in one table.
- FLOAT32, FLOAT16: raw little-endian floats, no scales.
- STOCHASTIC (laq8 is bits=8): unbiased stochastic rounding onto 2^b evenly spaced levels on
  [-s, s], s = max|x|, scales=(s,).
- LAQ_GRID: the LAQ grid on an innovation v, R = ||v||_inf, tau = 1/(2^b - 1),
  q = floor((v + R)/(2 tau R) + 1/2), decode 2 tau R q - R, so |error| <= tau*R; with an rng the
  +1/2 becomes stochastic rounding on the same grid. scales=(R,).
- SIGN: one bit per value, decode s*sign(v) with s = mean|v| and ties (v == 0) going to +s.
- BLOCK_GRID: a symmetric grid with 0 on it, 2^(b-1) - 1 levels each side, one float32 radius
  per block of values at the head of the payload; scales=(block size,). See flq/codec/blockgrid.py.

STOCHASTIC and LAQ_GRID share one grid: index q in [0, 2^b - 1] stands for q*step - r with
step = 2r/(2^b - 1). Encoding computes t = v/step + (2^b - 1)/2 (+ 1/2, or + a uniform draw) in
float32 and truncates, which is floor because t >= 0. The uniform draw uses 16 random bits per
value placed at bin centres (k + 1/2)/2^16, so the rounding bias is below 2^-17 of a step (for
b >= 8 that is finer than float32 resolves t anyway). Four 16-bit draws per 64-bit generator
output measured 2-3x cheaper than float32 uniforms; the generator still dominates this codec.

Work runs in blocks of BLOCK_VALUES values so temporaries stay in cache and the extra memory stays
a few hundred kilobytes beyond the output. Scales near float32's limits (below 1e-30 or above
1e37, where float32 would lose the step to subnormals or overflow) are computed in float64.
"""

from __future__ import annotations

import math

import numpy as np

from flq.codec import blockgrid
from flq.codec.bitpack import (
    BLOCK_VALUES,
    MAX_BITS,
    MIN_BITS,
    PayloadBuffer,
    pack_into,
    packed_size,
    unpack_block,
    value_dtype,
)
from flq.codec.errors import CodecError
from flq.codec.tensor import Codec, EncodedTensor

FLOAT_DTYPES: dict[Codec, np.dtype[np.floating]] = {
    Codec.FLOAT32: np.dtype("<f4"),
    Codec.FLOAT16: np.dtype("<f2"),
}
_FLOAT16_OVERFLOW = 65520.0  # float32 values at or above this round to inf in float16
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Grid and sign constants outside this range are computed in float64 (rare: radii near
# float32's limits), so float32 never overflows or works with a subnormal step.
_FLOAT32_SAFE_MIN = 1e-30
_FLOAT32_SAFE_MAX = 1e37
_DITHER_BITS = 16


# ---------------------------------------------------------------- encoders


def encode_float32(x: np.ndarray) -> EncodedTensor:
    """Raw little-endian float32 (32 bits per value)."""
    values, _ = _finite_input(x)
    data = values.astype("<f4", copy=False).tobytes()
    return EncodedTensor(Codec.FLOAT32, values.shape, 32, (), data)


def encode_float16(x: np.ndarray) -> EncodedTensor:
    """Raw little-endian float16; values that would overflow float16 are refused."""
    values, peak = _finite_input(x)
    if peak >= _FLOAT16_OVERFLOW:
        raise CodecError(
            f"input: got max |x| = {peak:g}, expected < {_FLOAT16_OVERFLOW:g} to fit float16"
        )
    flat = values.reshape(-1)
    payload = PayloadBuffer(2 * flat.size)
    halves = np.empty(min(flat.size, BLOCK_VALUES), dtype="<f2")
    for start in range(0, flat.size, BLOCK_VALUES):
        block = flat[start : start + BLOCK_VALUES]
        np.copyto(halves[: block.size], block, casting="same_kind")
        payload.write(halves[: block.size])
    return EncodedTensor(Codec.FLOAT16, values.shape, 16, (), payload.finish())


def encode_stochastic(x: np.ndarray, bits: int, rng: np.random.Generator) -> EncodedTensor:
    """Unbiased stochastic `bits`-bit quantization with one scale s = max|x|: E[decode] = x."""
    check_bits_in(Codec.STOCHASTIC, bits, MIN_BITS, MAX_BITS)
    values, radius = _finite_input(x)
    data = _grid_payload(values.reshape(-1), bits, radius, rng)
    return EncodedTensor(Codec.STOCHASTIC, values.shape, bits, (radius,), data)


def encode_laq_grid(
    v: np.ndarray, bits: int, rng: np.random.Generator | None = None
) -> EncodedTensor:
    """LAQ grid on the innovation `v` (the caller forms g - Q_hat); |error| <= R/(2^b - 1).

    With `rng`, stochastic rounding on the same grid replaces round-to-nearest (unbiased).
    """
    check_bits_in(Codec.LAQ_GRID, bits, MIN_BITS, MAX_BITS)
    values, radius = _finite_input(v)
    data = _grid_payload(values.reshape(-1), bits, radius, rng)
    return EncodedTensor(Codec.LAQ_GRID, values.shape, bits, (radius,), data)


def encode_block_grid(
    v: np.ndarray, bits: int, block: int, rng: np.random.Generator | None = None
) -> EncodedTensor:
    """Block grid on `v`: |error| <= R_j/(2^b - 2) per value, R_j = max|v| of its block.

    With `rng`, stochastic rounding on the same levels replaces round-to-nearest (unbiased).
    """
    check_bits_in(Codec.BLOCK_GRID, bits, blockgrid.MIN_BITS, MAX_BITS)
    size = blockgrid.check_block(block)
    values, _ = _finite_input(v)
    data = blockgrid.encode(values.reshape(-1), bits, size, rng)
    return EncodedTensor(Codec.BLOCK_GRID, values.shape, bits, (float(size),), data)


def encode_sign(v: np.ndarray) -> EncodedTensor:
    """One bit per value (1 where v >= 0); decodes to s*sign(v), s = mean|v|, ties to +s."""
    values = np.asarray(v, dtype=np.float32)
    flat = values.reshape(-1)
    payload = PayloadBuffer(packed_size(flat.size, 1))
    positive = np.empty(min(flat.size, BLOCK_VALUES), dtype=np.bool_)
    magnitude = np.empty(min(flat.size, BLOCK_VALUES), dtype=np.float32)
    ones = np.ones(min(flat.size, BLOCK_VALUES), dtype=np.float32)
    total = 0.0
    for start in range(0, flat.size, BLOCK_VALUES):
        block = flat[start : start + BLOCK_VALUES]
        np.abs(block, out=magnitude[: block.size])
        # sum|v| as a dot product with ones: BLAS runs it ~3x faster than numpy's pairwise sum,
        # and float32 accumulation is ample for a scale. NaN, Inf and overflow show as a
        # non-finite total, handled below.
        with np.errstate(over="ignore"):
            total += float(np.dot(magnitude[: block.size], ones[: block.size]))
        np.greater_equal(block, 0, out=positive[: block.size])
        payload.write(np.packbits(positive[: block.size], bitorder="little"))
    if not math.isfinite(total):  # NaN or Inf in the input, or a float32 sum that overflowed
        _refuse_nonfinite(flat)
        total = float(np.abs(flat).sum(dtype=np.float64))
    mean_abs = float(np.float32(total / flat.size)) if flat.size else 0.0
    return EncodedTensor(Codec.SIGN, values.shape, 1, (mean_abs,), payload.finish())


# ---------------------------------------------------------------- checks and decoders


def check_bits_in(codec: Codec, bits: object, low: int, high: int) -> None:
    """CodecError naming the field unless `bits` is an int in low..high."""
    if not is_int(bits) or not low <= bits <= high:  # type: ignore[operator]
        expected = str(low) if low == high else f"{low}..{high}"
        raise CodecError(f"bits: got {bits!r}, expected {expected} for {codec.name}")


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_magnitudes(codec: Codec, names: tuple[str, ...], scales: tuple[float, ...]) -> None:
    """CodecError unless `scales` holds one finite, non-negative float32 value per name."""
    if len(scales) != len(names):
        raise CodecError(
            f"scales: got {len(scales)} values, expected {len(names)} ({list(names)}) "
            f"for {codec.name}"
        )
    for name, value in zip(names, scales, strict=True):
        if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
            raise CodecError(f"scales[{name}]: got {value!r}, expected a finite number")
        if value < 0:
            raise CodecError(f"scales[{name}]: got {value!r}, expected >= 0 (a magnitude)")
        if value > _FLOAT32_MAX:
            raise CodecError(f"scales[{name}]: got {value!r}, expected to fit float32")


def float_values(data: bytes, codec: Codec) -> np.ndarray:
    """Decode a raw float payload to float32."""
    return np.frombuffer(data, dtype=FLOAT_DTYPES[codec]).astype(np.float32)


def check_float_payload(data: bytes, dtype: np.dtype[np.floating], count: int) -> None:
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise CodecError(
            f"payload length: got {len(data)} bytes, expected {expected} "
            f"(= {count} values * {dtype.itemsize} bytes)"
        )
    floats = np.frombuffer(data, dtype=dtype)
    if _has_nonfinite(floats):
        bad = int(np.count_nonzero(~np.isfinite(floats)))
        raise CodecError(
            f"payload values: got {bad} NaN or Inf of {count}, expected finite {dtype.name}"
        )


def _has_nonfinite(floats: np.ndarray) -> bool:
    """True if any value is NaN or Inf, without a boolean temporary of the whole array."""
    if not floats.size:
        return False
    if floats.dtype.itemsize == 4:  # min and max propagate NaN and expose +-Inf
        return not (math.isfinite(floats.min()) and math.isfinite(floats.max()))
    # float16 reductions run in software: look at the bits instead. NaN and Inf are the values
    # whose exponent bits are all ones, i.e. |bits| >= 0x7C00.
    halves = floats.view("<u2")
    magnitude = np.empty(min(halves.size, BLOCK_VALUES), dtype="<u2")
    for start in range(0, halves.size, BLOCK_VALUES):
        block = halves[start : start + BLOCK_VALUES]
        np.bitwise_and(block, 0x7FFF, out=magnitude[: block.size])
        if magnitude[: block.size].max() >= 0x7C00:
            return True
    return False


# ---------------------------------------------------------------- input


def _finite_input(x: np.ndarray) -> tuple[np.ndarray, float]:
    """`x` as float32 (a view when it already is) and max|x|. Refuses NaN and Inf; never writes."""
    values = np.asarray(x, dtype=np.float32)
    flat = values.reshape(-1)
    low = high = 0.0
    # Per block, min and max run back to back on cached data; they propagate NaN and expose
    # +-Inf, so no boolean temporary is needed, and they give max|x| for free.
    for start in range(0, flat.size, BLOCK_VALUES):
        block = flat[start : start + BLOCK_VALUES]
        block_low, block_high = float(block.min()), float(block.max())
        if not (math.isfinite(block_low) and math.isfinite(block_high)):
            _refuse_nonfinite(flat)
        low, high = min(low, block_low), max(high, block_high)
    return values, max(high, -low)


def _refuse_nonfinite(flat: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(flat)))
    if bad:
        raise CodecError(
            f"input: contains NaN or Inf ({bad} of {flat.size} values), expected finite values"
        )


# ---------------------------------------------------------------- the shared grid


def _work_dtype(*magnitudes: float) -> np.dtype[np.floating]:
    """float32, unless a constant would overflow it or lose precision as a subnormal."""
    fits = all(m == 0.0 or _FLOAT32_SAFE_MIN <= abs(m) <= _FLOAT32_SAFE_MAX for m in magnitudes)
    return np.dtype(np.float32) if fits else np.dtype(np.float64)


def _grid_payload(
    flat: np.ndarray, bits: int, radius: float, rng: np.random.Generator | None
) -> bytes:
    """Packed grid indices of `flat` (float32, |flat| <= radius)."""
    size = packed_size(flat.size, bits)
    if radius == 0.0 or not flat.size:
        return bytes(size)  # every index 0 decodes to 0*step - 0 = 0 exactly
    quantizer = _GridQuantizer(bits, radius, rng, min(flat.size, BLOCK_VALUES))
    packed = np.empty(packed_size(min(flat.size, BLOCK_VALUES), bits), dtype=np.uint8)
    payload = PayloadBuffer(size)
    for start in range(0, flat.size, BLOCK_VALUES):
        indices = quantizer.indices(flat[start : start + BLOCK_VALUES])
        if bits in (8, 16):  # byte-aligned: the indices are the payload
            payload.write(indices)
        else:
            target = packed[: packed_size(indices.size, bits)]
            pack_into(indices, bits, target)
            payload.write(target)
    return payload.finish()


class _GridQuantizer:
    """Grid indices of one block at a time, in reused buffers (valid until the next call)."""

    def __init__(
        self, bits: int, radius: float, rng: np.random.Generator | None, block_len: int
    ) -> None:
        self._levels = (1 << bits) - 1
        per_step = self._levels / (2.0 * radius)  # t = v/step + levels/2 is in [0, levels]
        work = _work_dtype(per_step, radius)
        self._scale = work.type(per_step)
        # +1/2 rounds to nearest; a dither in [2^-17, 1 - 2^-17] rounds stochastically.
        half = 0.5 if rng is None else 2.0 ** -(_DITHER_BITS + 1)
        self._offset = work.type(self._levels / 2 + half)
        self._rng = rng
        self._position = np.empty(block_len, dtype=work)
        self._dither = np.empty(block_len if rng is not None else 0, dtype=work)
        self._indices = np.empty(block_len, dtype=value_dtype(bits))

    def indices(self, block: np.ndarray) -> np.ndarray:
        count = block.size
        indices = self._indices[:count]
        if self._levels == 1 and self._rng is None:
            # One bit, nearest level: floor(v/(2R) + 1) is 1 exactly when v >= 0. One comparison
            # instead of three passes (and exact where float32 would round -tiny/(2R) + 1 to 1).
            np.greater_equal(block, 0, out=indices)
            return indices
        t = self._position[:count]
        # dtype= pins the loop to the work dtype whatever the promotion rules (they changed in
        # numpy 2; numpy >= 1.23 is supported). The decoders do the same.
        np.multiply(block, self._scale, out=t, dtype=t.dtype)
        np.add(t, self._offset, out=t, dtype=t.dtype)
        if self._rng is not None:
            _add_dither(t, self._rng, self._dither[:count])
            # float32 rounding may push t past the top index
            np.minimum(t, t.dtype.type(self._levels), out=t)
        # t > -1, and truncation toward zero is floor for t >= 0 (and 0 for -1 < t < 0).
        np.copyto(indices, t, casting="unsafe")
        return indices


def _add_dither(t: np.ndarray, rng: np.random.Generator, scratch: np.ndarray) -> None:
    """t += k / 2^16 with k uniform in 0..2^16-1 (the bin-centre half is in the offset)."""
    words = -(-t.size // 4)  # four 16-bit draws per 64-bit word
    raw = rng.integers(0, 2**64 - 1, size=words, dtype=np.uint64, endpoint=True)
    draws = raw.view("<u2")[: t.size]
    np.multiply(draws, scratch.dtype.type(2.0**-_DITHER_BITS), out=scratch, dtype=scratch.dtype)
    np.add(t, scratch, out=t)


def grid_values(data: bytes, bits: int, count: int, radius: float) -> np.ndarray:
    """Decode packed grid indices: q*step - radius, step = 2*radius/(2^bits - 1)."""
    return _affine_values(data, bits, count, 2.0 * radius / ((1 << bits) - 1), radius)


def sign_values(data: bytes, count: int, mean_abs: float) -> np.ndarray:
    """Decode sign bits: bit 1 -> +s, bit 0 -> -s (as bit*2s - s, which is exact)."""
    return _affine_values(data, 1, count, 2.0 * mean_abs, mean_abs)


def _affine_values(data: bytes, bits: int, count: int, scale: float, shift: float) -> np.ndarray:
    """index*scale - shift for each of the `count` packed indices, as float32."""
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.float32)
    work = _work_dtype(scale, shift)
    scratch = None if work == np.float32 else np.empty(min(count, BLOCK_VALUES), dtype=work)
    scale_w, shift_w = work.type(scale), work.type(shift)
    for start in range(0, count, BLOCK_VALUES):
        stop = min(start + BLOCK_VALUES, count)
        byte_start = start * bits // 8
        chunk = raw[byte_start : byte_start + packed_size(stop - start, bits)]
        indices = unpack_block(chunk, bits, stop - start)
        target = out[start:stop] if scratch is None else scratch[: stop - start]
        np.multiply(indices, scale_w, out=target, dtype=work)
        np.subtract(target, shift_w, out=target, dtype=work)
        if scratch is not None:
            out[start:stop] = target
    return out

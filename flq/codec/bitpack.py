"""Pack unsigned integers of 1..16 bits into bytes, and back.

Bit order (the wire format, pinned by tests):
    value i occupies stream bits [i*b, (i+1)*b), least significant bit first, and stream bit k
    is bit (k % 8) of byte k // 8. That is numpy's ``bitorder="little"``: b=1 is
    ``np.packbits(values, bitorder="little")``, b=8 is the bytes themselves and b=16 is
    little-endian uint16. The pad bits of the last byte are zero.

Every width is vectorised. Widths 1, 2, 4, 8 and 16 have their own short paths; the others go
through 64-bit words: 8 values of b bits are exactly b bytes, so 8 values are gathered into one
(b <= 8) or two (b > 8) little-endian uint64 words by log-step shift-and-mask merges (pairs of
8-bit lanes, then of 16-bit lanes, then of 32-bit lanes), and each group's word is stored at byte
offset k*b through a strided (unaligned) uint64 view. Unpacking runs the same steps backwards
from overlapping 8-byte reads. Inputs are processed in blocks of BLOCK_VALUES so the temporaries
stay in cache and the extra memory stays small.
"""

from __future__ import annotations

import io

import numpy as np

from flq.codec.errors import CodecError

MIN_BITS = 1
MAX_BITS = 16
# Values per block: a multiple of 8 (a whole number of bytes for every width). A float32 block is
# 512 KiB, so a few temporaries fit a 1-2 MiB L2; of 2^15..2^18, 2^17 measured fastest here.
BLOCK_VALUES = 1 << 17

_U64 = np.dtype("<u8")
_U32 = np.dtype("<u4")
_U16 = np.dtype("<u2")
_U8 = np.dtype(np.uint8)


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take: ceil(count*bits/8)."""
    return (count * bits + 7) // 8


def check_bits(bits: int) -> None:
    """Raise CodecError unless `bits` is a packable width (1..16)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise CodecError(f"bits: got {bits!r}, expected an int in {MIN_BITS}..{MAX_BITS}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise CodecError(f"bits: got {bits}, expected {MIN_BITS}..{MAX_BITS}")


def value_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    """The dtype unpacked values take: uint8 up to 8 bits, little-endian uint16 above."""
    return _U8 if bits <= 8 else _U16


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ints `values` (each < 2**bits, any shape, flattened in C order) into bytes."""
    check_bits(bits)
    flat = _checked_values(np.asarray(values), bits)
    payload = PayloadBuffer(packed_size(flat.size, bits))
    packed = np.empty(packed_size(min(flat.size, BLOCK_VALUES), bits), dtype=_U8)
    for start in range(0, flat.size, BLOCK_VALUES):
        block = flat[start : start + BLOCK_VALUES]
        target = packed[: packed_size(block.size, bits)]
        pack_into(block, bits, target)
        payload.write(target)
    return payload.finish()


def unpack_bits(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """The `count` values packed in `data`: uint8 for bits <= 8, uint16 for bits <= 16."""
    check_bits(bits)
    raw = np.frombuffer(data, dtype=_U8)
    check_payload(raw.size, bits, count)
    out = np.empty(count, dtype=value_dtype(bits))
    for start in range(0, count, BLOCK_VALUES):
        stop = min(start + BLOCK_VALUES, count)
        offset = start * bits // 8
        chunk = raw[offset : offset + packed_size(stop - start, bits)]
        out[start:stop] = unpack_block(chunk, bits, stop - start)
    return out


def check_payload(nbytes: int, bits: int, count: int) -> None:
    """Raise CodecError unless `nbytes` is exactly what `count` values of `bits` bits need."""
    if count < 0:
        raise CodecError(f"count: got {count}, expected >= 0")
    expected = packed_size(count, bits)
    if nbytes != expected:
        raise CodecError(
            f"payload length: got {nbytes} bytes, expected {expected} (= ceil({count}*{bits}/8))"
        )


class PayloadBuffer:
    """The payload of one tensor, written block by block into a single presized buffer.

    CPython's BytesIO.getvalue() hands over its internal bytes object without copying when it is
    full and not shared, so the payload is allocated once: no second output-sized array and no
    final copy. Fresh output memory costs first-touch page faults (about 2 us per 4 KiB page on
    the development VM), which dominated encode time when the payload was built twice.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._buffer = io.BytesIO()
        if size:
            self._buffer.seek(size - 1)
            self._buffer.write(b"\0")  # presize: later writes overwrite in place
            self._buffer.seek(0)

    def write(self, block: np.ndarray) -> None:
        """Append the bytes of `block` (contiguous)."""
        self._buffer.write(np.ascontiguousarray(block).data)

    def finish(self) -> bytes:
        """The payload; every byte must have been written."""
        if self._buffer.tell() != self._size:
            raise AssertionError(f"payload: wrote {self._buffer.tell()} of {self._size} bytes")
        return self._buffer.getvalue()


# ---------------------------------------------------------------- block level


def pack_into(values: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack one block of in-range values (dtype value_dtype(bits)) into `out` (uint8).

    `out` must hold exactly packed_size(len(values), bits) bytes. No range check: callers that
    produced the values (the quantizers) know they fit.
    """
    count = values.size
    if count % 8:
        padded = np.zeros(count + 8 - count % 8, dtype=values.dtype)  # zero pad bits
        padded[:count] = values
        out[:] = _pack_groups(padded, bits)[: out.size]
    else:
        out[:] = _pack_groups(values, bits)


def unpack_block(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack `count` values from one block of exactly packed_size(count, bits) bytes."""
    groups = -(-count // 8)
    whole = groups * bits
    if data.size != whole:
        padded = np.zeros(whole, dtype=_U8)
        padded[: data.size] = data
        data = padded
    return _unpack_groups(data, bits)[:count]


def _checked_values(values: np.ndarray, bits: int) -> np.ndarray:
    """`values` flattened and cast to value_dtype(bits), after checking every one is in range."""
    if values.dtype.kind not in "biu":
        raise CodecError(f"values: got dtype {values.dtype}, expected unsigned integers")
    flat = values.reshape(-1)
    if flat.size:
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= 1 << bits:
            raise CodecError(
                f"values: got range [{low}, {high}], expected 0..{(1 << bits) - 1} for {bits} bits"
            )
    return np.ascontiguousarray(flat, dtype=value_dtype(bits))


def _pack_groups(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack len(values) (a multiple of 8) values into len(values)*bits/8 bytes."""
    if bits == 1:
        return np.packbits(values, bitorder="little")
    if bits == 8:
        return values
    if bits == 16:
        return values.astype(_U16, copy=False).view(_U8)
    if bits == 2:
        return _pack_2(values)
    if bits == 4:
        return _pack_4(values)
    if bits < 8:
        return _pack_small(values, bits)
    return _pack_wide(values, bits)


def _unpack_groups(data: np.ndarray, bits: int) -> np.ndarray:
    """Unpack whole groups: len(data) is a multiple of `bits`, giving len(data)*8/bits values."""
    if bits == 1:
        return np.unpackbits(data, bitorder="little")
    if bits == 8:
        return data
    if bits == 16:
        return data.view(_U16)
    if bits == 2:
        return _unpack_2(data)
    if bits == 4:
        return _unpack_4(data)
    if bits < 8:
        return _unpack_small(data, bits)
    return _unpack_wide(data, bits)


# ---------------------------------------------------------------- fast paths


def _pack_2(values: np.ndarray) -> np.ndarray:
    # A 32-bit word holds v0..v3 in its bytes. Multiplying by 2^24 + 2^18 + 2^12 + 2^6 lands
    # v_i at bit 24 + 2i; the cross terms overflow past bit 31 or sum to < 2^24 (checked in the
    # tests against every combination), so the top byte is v0 | v1<<2 | v2<<4 | v3<<6.
    words: np.ndarray = np.multiply(values.view(_U32), np.uint32(0x01041040))
    np.right_shift(words, np.uint32(24), out=words)
    return words.astype(_U8)


def _unpack_2(data: np.ndarray) -> np.ndarray:
    words = data.astype(_U32)
    words |= words << np.uint32(12)
    words &= np.uint32(0x000F000F)
    words |= words << np.uint32(6)
    words &= np.uint32(0x03030303)
    return words.view(_U8)


def _pack_4(values: np.ndarray) -> np.ndarray:
    pairs = values.view(_U16)
    merged: np.ndarray = pairs | (pairs >> np.uint16(4))
    return merged.astype(_U8)


def _unpack_4(data: np.ndarray) -> np.ndarray:
    pairs = data.astype(_U16)
    pairs |= pairs << np.uint16(4)
    pairs &= np.uint16(0x0F0F)
    return pairs.view(_U8)


# ---------------------------------------------------------------- general widths


def _lane_masks(lane_bits: int, field_bits: int) -> tuple[np.uint64, np.uint64]:
    """Masks over a uint64 of lanes of `lane_bits`: (low field, the field just above it)."""
    field = (1 << field_bits) - 1
    low = high = 0
    for lane in range(0, 64, lane_bits):
        low |= field << lane
        high |= field << (lane + field_bits)
    mask64 = (1 << 64) - 1
    return np.uint64(low & mask64), np.uint64(high & mask64)


def _merge_lanes(words: np.ndarray, lane_bits: int, field_bits: int) -> np.ndarray:
    """In each lane of 2*lane_bits, move the upper half's field down next to the lower one."""
    low_mask, high_mask = _lane_masks(2 * lane_bits, field_bits)
    upper = words >> np.uint64(lane_bits - field_bits)
    upper &= high_mask
    words = words & low_mask
    words |= upper
    return words


def _split_lanes(words: np.ndarray, lane_bits: int, field_bits: int) -> np.ndarray:
    """Inverse of _merge_lanes: move the field above the low one up to the next lane."""
    low_mask, high_mask = _lane_masks(2 * lane_bits, field_bits)
    upper = np.bitwise_and(words, high_mask)
    np.left_shift(upper, np.uint64(lane_bits - field_bits), out=upper)
    words = words & low_mask
    words |= upper
    return words


def _pack_small(values: np.ndarray, bits: int) -> np.ndarray:
    """bits 3, 5, 6, 7: 8 byte-lanes of one uint64 merge into its low `bits` bytes."""
    words = values.view(_U64)
    words = _merge_lanes(words, 8, bits)
    words = _merge_lanes(words, 16, 2 * bits)
    words = _merge_lanes(words, 32, 4 * bits)
    # Group k's word goes to byte offset k*bits. Words overlap the next groups by 8 - bits
    # bytes, all zero, so OR-ing them into a zeroed buffer is exact; each pass takes every
    # `passes`-th group, whose 8-byte writes do not overlap one another.
    groups = words.size
    out = np.zeros(groups * bits + 8, dtype=_U8)
    passes = -(-8 // bits)
    for first in range(passes):
        target = _words_at(out, first * bits, passes * bits, len(range(first, groups, passes)))
        np.bitwise_or(target, words[first::passes], out=target)
    return out[: groups * bits]


def _unpack_small(data: np.ndarray, bits: int) -> np.ndarray:
    groups = data.size // bits
    padded = _with_slack(data)
    # Overlapping 8-byte reads at offsets k*bits, cut to their own `bits` bytes.
    words = np.bitwise_and(_words_at(padded, 0, bits, groups), np.uint64((1 << 8 * bits) - 1))
    words = _split_lanes(words, 32, 4 * bits)
    words = _split_lanes(words, 16, 2 * bits)
    words = _split_lanes(words, 8, bits)
    return words.view(_U8)


def _pack_wide(values: np.ndarray, bits: int) -> np.ndarray:
    """bits 9..15: each uint64 holds 4 uint16 lanes -> 4*bits bits; two words make `bits` bytes."""
    words = values.view(_U64)
    words = _merge_lanes(words, 16, bits)
    words = _merge_lanes(words, 32, 2 * bits)
    first, second = words[0::2], words[1::2]
    half = 4 * bits  # bits held by each word, 36..60
    low = first | (second << np.uint64(half))  # overflow of `second` wraps away: kept in `high`
    high = second >> np.uint64(64 - half)
    groups = low.size
    out = np.empty(groups * bits + 8, dtype=_U8)
    # Write the high words (bytes 8.. of each group, zero-padded) first, then the low words:
    # each low write covers the zero padding the previous group's high write spilled over.
    _words_at(out, 8, bits, groups)[:] = high
    _words_at(out, 0, bits, groups)[:] = low
    return out[: groups * bits]


def _unpack_wide(data: np.ndarray, bits: int) -> np.ndarray:
    groups = data.size // bits
    padded = _with_slack(data)
    low = np.array(_words_at(padded, 0, bits, groups))
    high = np.bitwise_and(_words_at(padded, 8, bits, groups), np.uint64((1 << 8 * bits - 64) - 1))
    half = 4 * bits
    words = np.empty(2 * groups, dtype=_U64)
    np.bitwise_and(low, np.uint64((1 << half) - 1), out=words[0::2])
    second = low >> np.uint64(half)
    second |= high << np.uint64(64 - half)
    words[1::2] = second
    words = _split_lanes(words, 32, 2 * bits)
    words = _split_lanes(words, 16, bits)
    return words.view(_U16)


def _words_at(buffer: np.ndarray, offset: int, stride: int, count: int) -> np.ndarray:
    """`count` little-endian uint64 read from `buffer` (uint8) at offset, offset+stride, ...

    Unaligned and, for stride < 8, overlapping; numpy handles unaligned access itself.
    """
    words: np.ndarray = np.ndarray(
        shape=(count,), dtype=_U64, buffer=buffer, offset=offset, strides=(stride,)
    )
    return words


def _with_slack(data: np.ndarray) -> np.ndarray:
    """`data` followed by 8 zero bytes, so an 8-byte read at any byte offset stays inside."""
    padded = np.zeros(data.size + 8, dtype=_U8)
    padded[: data.size] = data
    return padded

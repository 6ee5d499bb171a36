"""A second code for sparse ternary positions: gap classes under a per-tensor Huffman code.

Golomb-Rice (flq/codec/sparse.py) is optimal when the kept positions are a Bernoulli process.
The top values of a real CNN update are not: they cluster (some filters, some input features), so
the gaps mix many small ones with a few long ones. Measured on this project's CNN
(bench/bench_update_error.py, docs/benchmarks.md) this code needs ~7.1 bits per kept value
where Golomb-Rice needs ~9.35 at p = 1 %.

Each gap d >= 0 falls in class c = floor(log2(d + 1)) (Elias-gamma's class); the class is sent
with a canonical Huffman code built from this tensor's own class counts, then the c bits of
d + 1 below its leading one (least significant first), then the sign (1 = +mu).

Payload: the code lengths of classes 0..m-1, 4 bits each (0 = class unused), padded to a byte,
then the codewords in increasing position order, bits least significant first into bytes as in
flq.codec.bitpack (a Huffman codeword's bits go most significant first), zero-padded. Header:
bits = m (the number of classes), scales = (mu, nnz), as SPARSE_TERNARY.

The encoder (flq/codec/sparse.py) computes both codes' exact sizes and sends the smaller.
"""

from __future__ import annotations

import heapq

import numpy as np

from flq.codec.errors import CodecError

MAX_CODE_BITS = 15  # code lengths travel in 4 bits
MAX_CLASSES = 32  # gaps below 2^32
_LENGTH_BITS = 4


def classes_of(gaps: np.ndarray) -> np.ndarray:
    """c = floor(log2(d + 1)) for each gap d, exactly (integer arithmetic, no float log)."""
    values = gaps.astype(np.int64) + 1
    classes = np.zeros(values.size, dtype=np.int64)
    for shift in (16, 8, 4, 2, 1):  # binary search for the leading one
        high = values >= (1 << shift)
        classes[high] += shift
        values[high] >>= shift
    return classes


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths for symbol `counts` (0 where a count is 0), at most MAX_CODE_BITS."""
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if not used.size:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    weights = counts[used].astype(np.float64)
    while True:
        depth = _huffman_depths(weights)
        if depth.max() <= MAX_CODE_BITS:
            lengths[used] = depth
            return lengths
        weights = np.sqrt(weights)  # flatten the distribution until the code fits 4-bit lengths


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    heap: list[tuple[float, int, list[int]]] = [(float(w), i, [i]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    depth = np.zeros(weights.size, dtype=np.int64)
    tie = weights.size
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        depth[s1 + s2] += 1
        heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
        tie += 1
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical Huffman code value of each symbol (by length, then symbol)."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    code = 0
    previous = 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        previous = int(lengths[symbol])
        code += 1
    return codes


def header_size_bits(classes: int) -> int:
    return -(-(_LENGTH_BITS * classes) // 8) * 8


def plan(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(classes of the gaps, code lengths, exact payload bits before padding) for `gaps`."""
    classes = classes_of(gaps)
    count = int(classes.max()) + 1 if classes.size else 1
    lengths = code_lengths(np.bincount(classes, minlength=count))
    bits = header_size_bits(count) + int((lengths[classes] + classes + 1).sum())
    return classes, lengths, bits


def encode(gaps: np.ndarray, positive: np.ndarray) -> tuple[bytes, int]:
    """(payload, number of classes m) for gaps >= 0 and their signs."""
    classes, lengths, total = plan(gaps)
    m = lengths.size
    stream = np.zeros(-(-total // 8) * 8, dtype=np.uint8)
    for symbol in range(m):  # the code lengths, 4 bits each, least significant first
        for bit in range(_LENGTH_BITS):
            stream[_LENGTH_BITS * symbol + bit] = (lengths[symbol] >> bit) & 1
    if gaps.size:
        codes = canonical_codes(lengths)
        own = lengths[classes]
        sizes = own + classes + 1
        starts = np.empty(gaps.size, dtype=np.int64)
        starts[0] = header_size_bits(m)
        np.cumsum(sizes[:-1], out=starts[1:])
        starts[1:] += header_size_bits(m)
        for bit in range(int(own.max())):  # codeword bits, most significant first
            has = own > bit
            stream[starts[has] + bit] = (codes[classes[has]] >> (own[has] - 1 - bit)) & 1
        below = gaps.astype(np.int64) + 1  # the bits under the leading one
        for bit in range(int(classes.max())):
            has = classes > bit
            stream[starts[has] + own[has] + bit] = (below[has] >> bit) & 1
        stream[starts + own + classes] = positive
    return np.packbits(stream, bitorder="little").tobytes(), m


def max_payload_bytes(classes: int, nnz: int) -> int:
    """The most bytes nnz codewords of m = `classes` classes can take."""
    per_value = MAX_CODE_BITS + max(classes - 1, 0) + 1
    return (header_size_bits(classes) + nnz * per_value + 7) // 8


def decode(data: bytes, classes: int, nnz: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, positive); CodecError unless `data` is exactly the header and nnz codewords."""
    if not 1 <= classes <= MAX_CLASSES:
        raise CodecError(f"bits: got {classes}, expected 1..{MAX_CLASSES} classes")
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    head = header_size_bits(classes)
    if stream.size < head:
        raise CodecError(f"payload length: got {len(data)} bytes, shorter than its code table")
    lengths = stream[: _LENGTH_BITS * classes].reshape(classes, _LENGTH_BITS).astype(np.int64)
    lengths = lengths @ (1 << np.arange(_LENGTH_BITS))
    _check_lengths(lengths, nnz)
    if nnz == 0:
        if len(data) * 8 != head or stream[_LENGTH_BITS * classes :].any():
            raise CodecError(f"payload length: got {len(data)} bytes, expected {head // 8}")
        return np.zeros(0, np.int64), np.zeros(0, bool)
    symbol_at, length_at = _decode_table(lengths)
    body = stream[head:]
    windows = _windows(body, int(lengths.max()))
    symbol, own = symbol_at[windows], length_at[windows]
    size = body.size
    invalid = size + 1
    jump = np.where(symbol >= 0, np.arange(size) + own + np.maximum(symbol, 0) + 1, invalid)
    jump = np.append(np.minimum(jump, invalid), [invalid, invalid])
    starts = np.zeros(1, dtype=np.int64)
    while starts.size < nnz:
        starts = np.concatenate((starts, jump[starts]))
        jump = jump[jump]
    starts = starts[:nnz]
    if starts.max() >= size or (symbol[starts] < 0).any():
        raise CodecError(f"payload: codewords do not parse as {nnz} gaps")
    classes_read, own_read = symbol[starts], own[starts]
    end = int(starts[-1] + own_read[-1] + classes_read[-1] + 1)
    if end > size or -(-(head + end) // 8) != len(data) or body[end:].any():
        raise CodecError(
            f"payload length: got {len(data)} bytes, expected {-(-(head + end) // 8)} "
            f"(= {head + end} bits of table and {nnz} codewords, zero-padded)"
        )
    below = np.ones(nnz, dtype=np.int64) << classes_read
    for bit in range(int(classes_read.max())):
        has = classes_read > bit
        below[has] |= body[starts[has] + own_read[has] + bit].astype(np.int64) << bit
    positive = body[starts + own_read + classes_read].astype(bool)
    return below - 1, positive


def _check_lengths(lengths: np.ndarray, nnz: int) -> None:
    used = lengths[lengths > 0]
    if nnz and not used.size:
        raise CodecError("payload code table: no class has a code")
    kraft = float(np.sum(2.0 ** -used.astype(np.float64)))
    if kraft > 1.0:
        raise CodecError(f"payload code table: lengths {lengths.tolist()} are not a prefix code")


def _decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every window of max-length bits (most significant first): its symbol (-1: none)
    and that symbol's code length."""
    top = int(lengths.max())
    symbol_at = np.full(1 << top, -1, dtype=np.int64)
    length_at = np.zeros(1 << top, dtype=np.int64)
    codes = canonical_codes(lengths)
    for symbol in np.flatnonzero(lengths):
        span = top - int(lengths[symbol])
        first = int(codes[symbol]) << span
        symbol_at[first : first + (1 << span)] = symbol
        length_at[first : first + (1 << span)] = lengths[symbol]
    return symbol_at, length_at


def _windows(body: np.ndarray, width: int) -> np.ndarray:
    """The next `width` bits at every position as an integer, the first bit most significant
    (bits past the end read as 0)."""
    padded = np.concatenate((body.astype(np.int64), np.zeros(width, dtype=np.int64)))
    windows = np.zeros(body.size, dtype=np.int64)
    for bit in range(width):
        windows |= padded[bit : bit + body.size] << (width - 1 - bit)
    return windows

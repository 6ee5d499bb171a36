"""A lossless stage for the grid codecs: their indices, one byte each, under bzip2.

The block grid's and the LAQ grid's indices are far from uniform: on this project's CNN most
values quantize to the level at 0 (or the middle of the LAQ grid), and the ones that do not
cluster in whole rows and filters (a dense layer's update is a sum of outer products, so an
input unit that stayed at 0 zeroes a whole row). Measured on real updates of the benchmark CNN
(bench/bench_update_error.py, docs/benchmarks.md) a per-symbol Huffman code gets a 3-bit block
grid index from 3 bits to ~1.5; bzip2 (Burrows-Wheeler, move-to-front, Huffman), which also sees
the runs, gets it to 0.3-0.8, and an 8-bit LAQ-grid downlink delta from 8 bits to ~3.9.
bzip2 comes with Python (the `bz2` module, libbz2): nothing to install, C speed (~30 ms to
compress a 3-bit update of the 467,818-parameter CNN here, ~10 ms to decompress), and of
zlib, lzma and bzip2 it measured the best bits for the time on these indices.

Payload of BLOCK_GRID_BZ2 / LAQ_GRID_BZ2: the base codec's payload with its packed index
section replaced by the bzip2 stream of the indices as bytes (one byte each for b <= 8,
little-endian uint16 above). Header (bits, scales) as the base codec. The encoder sends the
compressed form only where it is smaller (`smaller`). Decoding never inflates more than the
tensor's own count of indices (a bomb is an error, not a memory spike) and then runs every
check of the base codec.
"""

from __future__ import annotations

import bz2

import numpy as np

from flq.codec import blockgrid
from flq.codec.bitpack import pack_bits, unpack_bits, value_dtype
from flq.codec.errors import CodecError
from flq.codec.tensor import Codec, EncodedTensor

COMPRESSED_OF = {Codec.BLOCK_GRID: Codec.BLOCK_GRID_BZ2, Codec.LAQ_GRID: Codec.LAQ_GRID_BZ2}
BASE_OF = {compressed: base for base, compressed in COMPRESSED_OF.items()}
_LEVEL = 9  # bzip2's 900 kB block: a whole tensor of this CNN in one block
# bzip2's worst case: 1 % larger plus 600 bytes (its manual, "bzBuffToBuffCompress").
_SLACK_BYTES = 600
# Below this many packed bytes bzip2's own header and tables (~40 bytes) cannot pay for
# themselves: such tensors (biases) are not tried.
_MIN_PACKED_BYTES = 60


def head_bytes(codec: Codec, count: int, scales: tuple[float, ...]) -> int:
    """Bytes of the base payload before its packed indices (the block radii)."""
    if codec in (Codec.BLOCK_GRID, Codec.BLOCK_GRID_BZ2):
        return blockgrid.RADIUS_BYTES * blockgrid.block_count(count, int(scales[0]))
    return 0


def index_bytes(count: int, bits: int) -> int:
    return count * value_dtype(bits).itemsize


def max_payload_bytes(codec: Codec, bits: int, count: int, scales: tuple[float, ...]) -> int:
    raw = index_bytes(count, bits)
    return head_bytes(codec, count, scales) + raw + raw // 100 + _SLACK_BYTES


def compress(enc: EncodedTensor) -> EncodedTensor:
    """The compressed form of a BLOCK_GRID or LAQ_GRID tensor (same header)."""
    head = head_bytes(enc.codec, enc.size, enc.scales)
    indices = unpack_bits(memoryview(enc.data)[head:], enc.bits, enc.size)
    stream = bz2.compress(indices.tobytes(), _LEVEL)  # unpack_bits gives value_dtype(bits)
    data = enc.data[:head] + stream
    return EncodedTensor(COMPRESSED_OF[enc.codec], enc.shape, enc.bits, enc.scales, data)


def smaller(enc: EncodedTensor) -> EncodedTensor:
    """`enc`, or its compressed form where that is smaller (small tensors stay packed)."""
    if enc.codec not in COMPRESSED_OF:
        return enc
    packed = enc.data[head_bytes(enc.codec, enc.size, enc.scales) :]
    if len(packed) <= _MIN_PACKED_BYTES:
        return enc
    compressed = compress(enc)
    return compressed if len(compressed.data) < len(enc.data) else enc


def expand(enc: EncodedTensor) -> EncodedTensor:
    """The base codec's tensor a compressed one stands for; CodecError naming what is wrong
    (its checks as the base codec are the caller's)."""
    head = head_bytes(enc.codec, enc.size, enc.scales)
    if len(enc.data) < head:
        raise CodecError(f"payload length: got {len(enc.data)} bytes, shorter than {head} of radii")
    indices = _inflate(enc.data[head:], enc.size, enc.bits)
    top = int(indices.max()) if indices.size else 0
    if top >= 1 << enc.bits:
        raise CodecError(f"payload values: got index {top}, expected < {1 << enc.bits}")
    data = enc.data[:head] + pack_bits(indices, enc.bits)
    return EncodedTensor(BASE_OF[enc.codec], enc.shape, enc.bits, enc.scales, data)


def _inflate(stream: bytes, count: int, bits: int) -> np.ndarray:
    expected = index_bytes(count, bits)
    inflater = bz2.BZ2Decompressor()
    try:
        raw = inflater.decompress(stream, max_length=expected)
    except (OSError, EOFError, ValueError) as exc:
        raise CodecError(f"payload: not a bzip2 stream of indices ({exc})") from None
    what = f"{expected} bytes (= {count} indices of {bits} bits)"
    if not inflater.eof:
        raise CodecError(f"payload: the bzip2 stream does not end after {what}: cut or too long")
    if len(raw) != expected:
        raise CodecError(f"payload: inflates to {len(raw)} bytes, expected {what}")
    if inflater.unused_data:
        raise CodecError(f"payload: {len(inflater.unused_data)} bytes after the bzip2 stream")
    return np.frombuffer(raw, dtype=value_dtype(bits))

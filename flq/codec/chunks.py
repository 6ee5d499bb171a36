"""Split encoded tensors into chunks of at most 1 MiB, group them into messages, reassemble them.

A tensor of T payload bytes travels as max(1, ceil(T / max_chunk_bytes)) chunks, each repeating
the small header so a receiver can check every chunk on its own. The Reassembler is the receiving
side's guard: chunks of a tensor must arrive in order, exactly once, with one header, and never
carry more bytes than that header implies, so a bad peer cannot make it buffer without bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from flq.codec.errors import CodecError
from flq.codec.registry import payload_bytes, validate
from flq.codec.tensor import Codec, EncodedTensor

MAX_CHUNK_BYTES = 1 << 20
DECODED_DTYPE = "float32"  # every codec decodes to float32


@dataclass(frozen=True)
class TensorChunk:
    """One piece of one encoded tensor, with the tensor's header repeated."""

    tensor_index: int
    tensor_count: int
    shape: tuple[int, ...]
    dtype: str  # dtype of the decoded tensor, "float32"
    codec: Codec
    bits: int
    scales: tuple[float, ...]
    chunk_index: int
    chunk_count: int
    data: bytes  # <= MAX_CHUNK_BYTES


def split_tensors(
    tensors: Sequence[EncodedTensor], max_chunk_bytes: int = MAX_CHUNK_BYTES
) -> list[TensorChunk]:
    """Every tensor as ceil(len(data)/max_chunk_bytes) chunks (at least one), in order."""
    _check_limit("max_chunk_bytes", max_chunk_bytes)
    chunks: list[TensorChunk] = []
    for index, tensor in enumerate(tensors):
        count = max(1, -(-len(tensor.data) // max_chunk_bytes))
        for part in range(count):
            piece = tensor.data[part * max_chunk_bytes : (part + 1) * max_chunk_bytes]
            chunks.append(_chunk_of(tensor, index, len(tensors), part, count, bytes(piece)))
    return chunks


def group_chunks(
    chunks: Sequence[TensorChunk], max_group_bytes: int = MAX_CHUNK_BYTES
) -> list[list[TensorChunk]]:
    """Consecutive chunks packed into groups of at most max_group_bytes of data (one message each).

    A group holds at least one chunk, so a chunk larger than the limit travels alone; no chunks at
    all still give one (empty) group, so a transfer of nothing is still one message.
    """
    _check_limit("max_group_bytes", max_group_bytes)
    groups: list[list[TensorChunk]] = [[]]
    filled = 0
    for chunk in chunks:
        if groups[-1] and filled + len(chunk.data) > max_group_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(chunk)
        filled += len(chunk.data)
    return groups


@dataclass
class _Partial:
    """What has arrived of one tensor so far."""

    first: TensorChunk
    expected_bytes: int
    parts: list[bytes] = field(default_factory=list)
    received_bytes: int = 0

    @property
    def whole(self) -> bool:
        return len(self.parts) == self.first.chunk_count


class Reassembler:
    """Collects the chunks of one transfer and hands back whole, validated tensors."""

    def __init__(
        self,
        expected_shapes: Sequence[tuple[int, ...]] | None = None,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
    ) -> None:
        _check_limit("max_chunk_bytes", max_chunk_bytes)
        self._expected_shapes = (
            None if expected_shapes is None else [tuple(s) for s in expected_shapes]
        )
        self._max_chunk_bytes = max_chunk_bytes
        self._tensor_count: int | None = None
        self._partials: dict[int, _Partial] = {}

    def add(self, chunk: TensorChunk) -> None:
        """Accept the next chunk or raise CodecError naming what is wrong with it."""
        where = f"tensor {chunk.tensor_index} chunk {chunk.chunk_index}"
        try:
            _check_counts(chunk)
            self._check_transfer(chunk)
            self._check_size_limit(chunk)
            partial = self._partials.get(chunk.tensor_index)
            if partial is None:
                partial = self._start_tensor(chunk)
            else:
                _check_same_header(partial.first, chunk)
            _check_order(partial, chunk)
            _check_running_size(partial, chunk)
        except CodecError as error:
            raise CodecError(f"{where}: {error}") from None
        self._tensor_count = chunk.tensor_count
        self._partials[chunk.tensor_index] = partial
        partial.parts.append(chunk.data)
        partial.received_bytes += len(chunk.data)

    @property
    def complete(self) -> bool:
        """True once every tensor of the transfer has all its chunks."""
        count = self._tensor_count
        if count is None:
            return self._expected_shapes == []
        return len(self._partials) == count and all(p.whole for p in self._partials.values())

    def finish(self) -> list[EncodedTensor]:
        """The tensors in index order; CodecError if any is missing, partial or invalid."""
        count = self._tensor_count
        if count is None:
            if self._expected_shapes == []:
                return []
            raise CodecError("tensor_count: got no chunk, expected at least one tensor")
        tensors: list[EncodedTensor] = []
        for index in range(count):
            partial = self._partials.get(index)
            if partial is None:
                raise CodecError(f"tensor {index}: missing, expected {count} tensors")
            if not partial.whole:
                raise CodecError(
                    f"tensor {index}: chunks: got {len(partial.parts)}, "
                    f"expected {partial.first.chunk_count}"
                )
            tensors.append(self._assemble(index, partial))
        return tensors

    # ------------------------------------------------------------ checks

    def _check_transfer(self, chunk: TensorChunk) -> None:
        expected = self._tensor_count
        if expected is None and self._expected_shapes is not None:
            expected = len(self._expected_shapes)
        if expected is not None and chunk.tensor_count != expected:
            raise CodecError(f"tensor_count: got {chunk.tensor_count}, expected {expected}")

    def _check_size_limit(self, chunk: TensorChunk) -> None:
        if len(chunk.data) > self._max_chunk_bytes:
            raise CodecError(
                f"data: got {len(chunk.data)} bytes, expected at most {self._max_chunk_bytes}"
            )

    def _start_tensor(self, chunk: TensorChunk) -> _Partial:
        if chunk.dtype != DECODED_DTYPE:
            raise CodecError(f"dtype: got {chunk.dtype!r}, expected {DECODED_DTYPE!r}")
        shape = tuple(chunk.shape)
        if self._expected_shapes is not None:
            expected_shape = self._expected_shapes[chunk.tensor_index]
            if shape != expected_shape:
                raise CodecError(f"shape: got {shape}, expected {expected_shape}")
        if any(d < 0 for d in shape):
            raise CodecError(f"shape: got {shape}, expected dims >= 0")
        size = math.prod(shape)
        expected = payload_bytes(chunk.codec, chunk.bits, size, tuple(chunk.scales))
        return _Partial(first=chunk, expected_bytes=expected)

    def _assemble(self, index: int, partial: _Partial) -> EncodedTensor:
        first = partial.first
        tensor = EncodedTensor(
            codec=Codec(first.codec),
            shape=tuple(first.shape),
            bits=first.bits,
            scales=tuple(first.scales),
            data=b"".join(partial.parts),
        )
        expected_shape = None if self._expected_shapes is None else self._expected_shapes[index]
        try:
            validate(tensor, expected_shape)
        except CodecError as error:
            raise CodecError(f"tensor {index}: {error}") from None
        return tensor


_HEADER_FIELDS = ("shape", "dtype", "codec", "bits", "scales", "chunk_count")


def _check_counts(chunk: TensorChunk) -> None:
    """Index and count fields that make sense on their own."""
    if chunk.tensor_count < 1:
        raise CodecError(f"tensor_count: got {chunk.tensor_count}, expected >= 1")
    if not 0 <= chunk.tensor_index < chunk.tensor_count:
        raise CodecError(
            f"tensor_index: got {chunk.tensor_index}, expected 0..{chunk.tensor_count - 1}"
        )
    if chunk.chunk_count < 1:
        raise CodecError(f"chunk_count: got {chunk.chunk_count}, expected >= 1")
    if not 0 <= chunk.chunk_index < chunk.chunk_count:
        raise CodecError(
            f"chunk_index: got {chunk.chunk_index}, expected 0..{chunk.chunk_count - 1}"
        )


def _check_same_header(first: TensorChunk, chunk: TensorChunk) -> None:
    for name in _HEADER_FIELDS:
        got, expected = getattr(chunk, name), getattr(first, name)
        if name in ("shape", "scales"):  # sequences: a list from the wire equals a tuple
            got, expected = tuple(got), tuple(expected)
        if got != expected:
            raise CodecError(f"{name}: got {got!r}, expected {expected!r} (as in chunk 0)")


def _check_order(partial: _Partial, chunk: TensorChunk) -> None:
    expected = len(partial.parts)
    if chunk.chunk_index < expected:
        raise CodecError(f"chunk_index: got {chunk.chunk_index} again (duplicate chunk)")
    if chunk.chunk_index != expected:
        raise CodecError(
            f"chunk_index: got {chunk.chunk_index}, expected {expected} (chunks arrive in order)"
        )


def _check_running_size(partial: _Partial, chunk: TensorChunk) -> None:
    total = partial.received_bytes + len(chunk.data)
    if total > partial.expected_bytes:
        raise CodecError(
            f"data: {total} bytes so far, expected at most {partial.expected_bytes} "
            f"for shape {tuple(partial.first.shape)} at {partial.first.bits} bits"
        )


def _check_limit(name: str, value: int) -> None:
    if value < 1:
        raise CodecError(f"{name}: got {value}, expected >= 1")


def _chunk_of(
    tensor: EncodedTensor, index: int, count: int, part: int, parts: int, data: bytes
) -> TensorChunk:
    return TensorChunk(
        tensor_index=index,
        tensor_count=count,
        shape=tuple(tensor.shape),
        dtype=DECODED_DTYPE,
        codec=tensor.codec,
        bits=tensor.bits,
        scales=tuple(tensor.scales),
        chunk_index=part,
        chunk_count=parts,
        data=data,
    )

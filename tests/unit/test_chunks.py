"""Chunking: split, group, reassemble, and refuse every malformed sequence of chunks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flq.codec import (
    MAX_CHUNK_BYTES,
    Codec,
    CodecError,
    EncodedTensor,
    Reassembler,
    TensorChunk,
    encode_block_grid,
    encode_float32,
    encode_laq_grid,
    encode_sign,
    group_chunks,
    split_tensors,
)


def model_update() -> list[EncodedTensor]:
    """Tensors of several codecs and sizes, including an empty and a 0-d one."""
    rng = np.random.default_rng(0)
    return [
        encode_laq_grid(rng.standard_normal((30, 7)).astype(np.float32), 3),  # 79 bytes
        encode_float32(rng.standard_normal(50).astype(np.float32)),  # 200 bytes
        encode_sign(np.zeros((0, 4), dtype=np.float32)),  # 0 bytes
        encode_laq_grid(np.float32(2.5), 8),  # 0-d, 1 byte
    ]


def reassemble(chunks: list[TensorChunk], **kwargs: object) -> list[EncodedTensor]:
    reassembler = Reassembler(**kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        reassembler.add(chunk)
    assert reassembler.complete
    return reassembler.finish()


def test_split_repeats_header_and_cuts_at_the_limit() -> None:
    tensors = model_update()
    chunks = split_tensors(tensors, max_chunk_bytes=64)
    # 79 -> 2 chunks, 200 -> 4, empty -> 1, 1 byte -> 1
    assert [c.tensor_index for c in chunks] == [0, 0, 1, 1, 1, 1, 2, 3]
    assert [(c.chunk_index, c.chunk_count) for c in chunks[2:6]] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [len(c.data) for c in chunks] == [64, 15, 64, 64, 64, 8, 0, 1]
    for chunk in chunks:
        tensor = tensors[chunk.tensor_index]
        assert chunk.tensor_count == 4
        assert (chunk.shape, chunk.codec, chunk.bits, chunk.scales) == (
            tensor.shape,
            tensor.codec,
            tensor.bits,
            tensor.scales,
        )
        assert chunk.dtype == "float32"


def test_default_limit_is_one_mebibyte() -> None:
    assert MAX_CHUNK_BYTES == 1 << 20
    big = encode_float32(np.zeros(300_000, dtype=np.float32))  # 1.2 MB
    chunks = split_tensors([big])
    assert [len(c.data) for c in chunks] == [MAX_CHUNK_BYTES, 1_200_000 - MAX_CHUNK_BYTES]


def test_round_trip_returns_equal_tensors_in_order() -> None:
    tensors = model_update()
    for limit in (1, 7, 64, MAX_CHUNK_BYTES):
        chunks = split_tensors(tensors, max_chunk_bytes=limit)
        shapes = [t.shape for t in tensors]
        assert reassemble(chunks, expected_shapes=shapes, max_chunk_bytes=limit) == tensors


def test_block_grid_tensors_cross_chunks_with_their_radii() -> None:
    rng = np.random.default_rng(5)
    tensors = [
        encode_block_grid(rng.standard_normal(1000).astype(np.float32), 3, 64),  # 64 + 375 bytes
        encode_block_grid(np.zeros(0, dtype=np.float32), 2, 16),
    ]
    for limit in (1, 50, MAX_CHUNK_BYTES):
        chunks = split_tensors(tensors, max_chunk_bytes=limit)
        shapes = [t.shape for t in tensors]
        assert reassemble(chunks, expected_shapes=shapes, max_chunk_bytes=limit) == tensors
    short = split_tensors(tensors[:1], max_chunk_bytes=50)
    short[-1] = dataclasses.replace(short[-1], data=short[-1].data[:-1])
    with pytest.raises(CodecError, match="expected 439"):
        reassemble(short, max_chunk_bytes=50)


def test_tensors_may_arrive_interleaved_as_long_as_each_is_in_order() -> None:
    tensors = model_update()
    chunks = split_tensors(tensors, max_chunk_bytes=64)
    interleaved = [chunks[i] for i in (2, 0, 3, 6, 1, 4, 7, 5)]
    assert reassemble(interleaved, max_chunk_bytes=64) == tensors


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    limit=st.integers(1, 128),
    group_limit=st.integers(1, 400),
)
def test_split_group_reassemble_identity(sizes: list[int], limit: int, group_limit: int) -> None:
    rng = np.random.default_rng(sum(sizes))
    tensors = [encode_laq_grid(rng.standard_normal(n).astype(np.float32), 5) for n in sizes]
    chunks = split_tensors(tensors, max_chunk_bytes=limit)
    groups = group_chunks(chunks, max_group_bytes=group_limit)
    assert [c for group in groups for c in group] == chunks  # order kept, nothing lost
    for group in groups:
        assert group
        assert len(group) == 1 or sum(len(c.data) for c in group) <= group_limit
    assert reassemble(chunks, max_chunk_bytes=limit) == tensors


def test_group_packs_consecutive_chunks_up_to_the_limit() -> None:
    chunks = split_tensors(model_update(), max_chunk_bytes=64)  # data 64,15,64,64,64,8,0,1
    groups = group_chunks(chunks, max_group_bytes=100)
    assert [[len(c.data) for c in g] for g in groups] == [[64, 15], [64], [64], [64, 8, 0, 1]]


def test_group_of_nothing_is_one_empty_group() -> None:
    assert group_chunks([]) == [[]]
    assert split_tensors([]) == []


def test_group_keeps_an_oversized_chunk_alone() -> None:
    chunks = split_tensors(model_update()[:2], max_chunk_bytes=1000)  # 79 and 200 bytes
    assert [len(g) for g in group_chunks(chunks, max_group_bytes=100)] == [1, 1]


def test_complete_only_when_every_chunk_arrived() -> None:
    chunks = split_tensors(model_update(), max_chunk_bytes=64)
    reassembler = Reassembler(max_chunk_bytes=64)
    assert not reassembler.complete
    for chunk in chunks[:-1]:
        reassembler.add(chunk)
        assert not reassembler.complete
    reassembler.add(chunks[-1])
    assert reassembler.complete


def test_zero_tensors_expected_is_complete_at_once() -> None:
    reassembler = Reassembler(expected_shapes=[])
    assert reassembler.complete
    assert reassembler.finish() == []


# ---------------------------------------------------------------- refusals


def chunks_of_update(limit: int = 64) -> list[TensorChunk]:
    return split_tensors(model_update(), max_chunk_bytes=limit)


def add_all(reassembler: Reassembler, chunks: list[TensorChunk]) -> None:
    for chunk in chunks:
        reassembler.add(chunk)


def test_out_of_order_chunk() -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(max_chunk_bytes=64)
    reassembler.add(chunks[2])  # tensor 1 chunk 0
    with pytest.raises(
        CodecError,
        match=r"^tensor 1 chunk 2: chunk_index: got 2, expected 1 \(chunks arrive in order\)",
    ):
        reassembler.add(chunks[4])  # tensor 1 chunk 2
    with pytest.raises(CodecError, match=r"^tensor 0 chunk 1: chunk_index: got 1, expected 0"):
        reassembler.add(chunks[1])  # tensor 0 chunk 1 before chunk 0


def test_duplicate_chunk() -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(max_chunk_bytes=64)
    add_all(reassembler, chunks[:2])
    with pytest.raises(
        CodecError, match=r"^tensor 0 chunk 0: chunk_index: got 0 again \(duplicate"
    ):
        reassembler.add(chunks[0])
    with pytest.raises(CodecError, match=r"^tensor 0 chunk 1: chunk_index: got 1 again"):
        reassembler.add(chunks[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shape", (210,)),
        ("dtype", "float64"),
        ("codec", Codec.STOCHASTIC),
        ("bits", 4),
        ("scales", (1.0,)),
        ("chunk_count", 3),
    ],
)
def test_header_mismatch_between_chunks_of_a_tensor(field: str, value: object) -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(max_chunk_bytes=64)
    reassembler.add(chunks[0])
    changed = dataclasses.replace(chunks[1], **{field: value})  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=rf"^tensor 0 chunk 1: {field}: got .*\(as in chunk 0\)"):
        reassembler.add(changed)


def test_oversized_chunk() -> None:
    chunks = split_tensors(model_update(), max_chunk_bytes=128)
    reassembler = Reassembler(max_chunk_bytes=64)
    with pytest.raises(
        CodecError, match=r"^tensor 0 chunk 0: data: got 79 bytes, expected at most 64"
    ):
        reassembler.add(chunks[0])


def test_more_bytes_than_the_header_implies() -> None:
    chunk = split_tensors(model_update()[:1], max_chunk_bytes=64)[1]  # 15 bytes of 79
    padded = dataclasses.replace(chunk, data=chunk.data + b"\x00")
    reassembler = Reassembler(max_chunk_bytes=64)
    reassembler.add(split_tensors(model_update()[:1], max_chunk_bytes=64)[0])
    with pytest.raises(
        CodecError, match=r"^tensor 0 chunk 1: data: 80 bytes so far, expected at most 79"
    ):
        reassembler.add(padded)
    # A forged single chunk claiming a tiny shape cannot smuggle a big payload either.
    forged = dataclasses.replace(chunk, chunk_index=0, chunk_count=1, shape=(2,), data=bytes(60))
    with pytest.raises(CodecError, match=r"data: 60 bytes so far, expected at most 1"):
        Reassembler().add(dataclasses.replace(forged, tensor_count=1))


def test_short_tensor_is_refused_at_finish() -> None:
    chunk = split_tensors(model_update()[:1], max_chunk_bytes=1000)[0]
    short = dataclasses.replace(chunk, data=chunk.data[:-1])
    reassembler = Reassembler()
    reassembler.add(short)
    assert reassembler.complete  # every chunk arrived...
    with pytest.raises(CodecError, match=r"^tensor 0: payload length: got 78 bytes, expected 79"):
        reassembler.finish()  # ...but the tensor is not whole


def test_missing_tensor() -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(max_chunk_bytes=64)
    add_all(reassembler, [c for c in chunks if c.tensor_index != 2])
    assert not reassembler.complete
    with pytest.raises(CodecError, match=r"^tensor 2: missing, expected 4 tensors"):
        reassembler.finish()


def test_missing_chunk() -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(max_chunk_bytes=64)
    add_all(reassembler, [c for c in chunks if (c.tensor_index, c.chunk_index) != (1, 3)])
    with pytest.raises(CodecError, match=r"^tensor 1: chunks: got 3, expected 4"):
        reassembler.finish()


def test_nothing_received() -> None:
    with pytest.raises(CodecError, match=r"^tensor_count: got no chunk"):
        Reassembler().finish()


def test_tensor_count_mismatch() -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(max_chunk_bytes=64)
    reassembler.add(chunks[0])
    with pytest.raises(CodecError, match=r"^tensor 1 chunk 0: tensor_count: got 5, expected 4"):
        reassembler.add(dataclasses.replace(chunks[2], tensor_count=5))
    expecting_three = Reassembler(expected_shapes=[(30, 7), (50,), (0, 4)], max_chunk_bytes=64)
    with pytest.raises(CodecError, match=r"^tensor 0 chunk 0: tensor_count: got 4, expected 3"):
        expecting_three.add(chunks[0])


def test_a_refused_chunk_changes_nothing() -> None:
    chunks = chunks_of_update()
    reassembler = Reassembler(expected_shapes=[t.shape for t in model_update()], max_chunk_bytes=64)
    with pytest.raises(CodecError):
        reassembler.add(dataclasses.replace(chunks[0], tensor_count=9))
    add_all(reassembler, chunks)
    assert reassembler.finish() == model_update()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tensor_index": 4}, r"tensor_index: got 4, expected 0\.\.3"),
        ({"tensor_count": 0, "tensor_index": 0}, r"tensor_count: got 0, expected >= 1"),
        ({"chunk_index": 2, "chunk_count": 2}, r"chunk_index: got 2, expected 0\.\.1"),
        ({"chunk_count": 0}, r"chunk_count: got 0, expected >= 1"),
        ({"shape": (7, 30)}, r"shape: got \(7, 30\), expected \(30, 7\)"),
        ({"dtype": "int8"}, r"dtype: got 'int8', expected 'float32'"),
        ({"bits": 0}, r"bits: got 0, expected 1\.\.16 for LAQ_GRID"),
        ({"codec": 42}, r"codec: got 42, expected one of"),
    ],
)
def test_malformed_first_chunk(changes: dict[str, object], message: str) -> None:
    first = chunks_of_update()[0]
    reassembler = Reassembler(expected_shapes=[t.shape for t in model_update()], max_chunk_bytes=64)
    with pytest.raises(CodecError, match=message):
        reassembler.add(dataclasses.replace(first, **changes))  # type: ignore[arg-type]


def test_finished_tensor_must_validate() -> None:
    chunk = split_tensors(model_update()[1:2])[0]  # float32, 50 values
    values = np.frombuffer(chunk.data, dtype="<f4").copy()
    values[3] = np.nan
    reassembler = Reassembler()
    reassembler.add(dataclasses.replace(chunk, data=values.tobytes()))
    with pytest.raises(CodecError, match=r"^tensor 0: payload values: got 1 NaN or Inf of 50"):
        reassembler.finish()


def test_bad_limits_are_refused() -> None:
    with pytest.raises(CodecError, match=r"^max_chunk_bytes: got 0, expected >= 1"):
        split_tensors(model_update(), max_chunk_bytes=0)
    with pytest.raises(CodecError, match=r"^max_group_bytes: got 0, expected >= 1"):
        group_chunks([], max_group_bytes=0)

"""The lossless stage: grid indices under bzip2, bit-exact, smaller only where it pays, and every
malformed stream refused before it can touch a model."""

from __future__ import annotations

import bz2
import dataclasses

import numpy as np
import pytest

from flq.algorithm import LazyParams, UploadReference, UploadSettings
from flq.algorithm.modes import check_upload, quantize_update, wire_form
from flq.codec import (
    Codec,
    CodecError,
    EncodedTensor,
    Reassembler,
    decode,
    encode_block_grid,
    encode_laq_grid,
    lossless,
    payload_bytes,
    split_tensors,
    validate,
)


def sparse_update(shape: tuple[int, int] = (400, 128), seed: int = 0) -> np.ndarray:
    """Like a dense layer's update: heavy-tailed, whole rows at 0 (inputs that stayed at 0)."""
    rng = np.random.default_rng(seed)
    live = rng.random((shape[0], 1)) < 0.3
    return (rng.standard_t(2, size=shape) * live).astype(np.float32)


def as_block_grid(x: np.ndarray, bits: int = 3) -> EncodedTensor:
    return encode_block_grid(x, bits, 256)


GRIDS = [
    pytest.param(lambda x: encode_block_grid(x, 3, 256), id="block grid b=3"),
    pytest.param(lambda x: encode_block_grid(x, 4, 64), id="block grid b=4"),
    pytest.param(lambda x: encode_laq_grid(x, 8), id="LAQ grid b=8"),
    pytest.param(lambda x: encode_laq_grid(x, 12), id="LAQ grid b=12 (two bytes an index)"),
]


@pytest.mark.parametrize("grid", GRIDS)
def test_compressed_tensor_decodes_to_the_same_bits(grid: object) -> None:
    packed = grid(sparse_update())  # type: ignore[operator]
    compressed = lossless.smaller(packed)
    assert compressed.codec is lossless.COMPRESSED_OF[packed.codec]
    assert (compressed.shape, compressed.bits, compressed.scales) == (
        packed.shape,
        packed.bits,
        packed.scales,
    )
    assert compressed.cost_bits() < packed.cost_bits() / 2
    validate(compressed, packed.shape)
    assert np.array_equal(decode(compressed), decode(packed))
    assert len(compressed.data) <= payload_bytes(
        compressed.codec, compressed.bits, compressed.size, compressed.scales
    )


def test_incompressible_and_tiny_tensors_stay_packed() -> None:
    noise = np.random.default_rng(1).uniform(-1, 1, 20_000).astype(np.float32)
    packed = encode_laq_grid(noise, 8)  # uniform indices: bzip2 cannot win
    assert lossless.smaller(packed) is packed
    bias = encode_block_grid(np.zeros(32, np.float32), 3, 256)
    assert lossless.smaller(bias) is bias
    float_tensor = EncodedTensor(Codec.FLOAT32, (1,), 32, (), b"\0\0\0\0")
    assert lossless.smaller(float_tensor) is float_tensor


def test_compressed_tensors_cross_chunks() -> None:
    tensors = [lossless.smaller(as_block_grid(sparse_update(seed=s))) for s in range(2)]
    chunks = split_tensors(tensors, max_chunk_bytes=500)
    reassembler = Reassembler(expected_shapes=[t.shape for t in tensors], max_chunk_bytes=500)
    for chunk in chunks:
        reassembler.add(chunk)
    assert reassembler.finish() == tensors


def with_stream(enc: EncodedTensor, stream: bytes) -> EncodedTensor:
    head = lossless.head_bytes(enc.codec, enc.size, enc.scales)
    return dataclasses.replace(enc, data=enc.data[:head] + stream)


def stream_of(enc: EncodedTensor) -> bytes:
    return enc.data[lossless.head_bytes(enc.codec, enc.size, enc.scales) :]


def indices_stream(indices: np.ndarray) -> bytes:
    return bz2.compress(indices.astype(np.uint8).tobytes())


@pytest.fixture
def compressed() -> EncodedTensor:
    return lossless.smaller(as_block_grid(sparse_update()))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s, n: s[:-5], "does not end after"),
        (lambda s, n: s + b"\0", "1 bytes after the bzip2 stream"),
        (lambda s, n: b"BZh9" + bytes(40), "not a bzip2 stream"),
        (lambda s, n: b"not bzip2 at all", "not a bzip2 stream"),
        (lambda s, n: indices_stream(np.full(n + 1, 3)), "does not end after"),  # a bomb
        (lambda s, n: indices_stream(np.full(n - 1, 3)), "inflates to"),
        (lambda s, n: indices_stream(np.full(n, 9)), "got index 9, expected < 8"),
        (lambda s, n: indices_stream(np.full(n, 7)), "got index 7, expected 0..6"),
    ],
)
def test_malformed_streams_are_refused(
    compressed: EncodedTensor, damage: object, message: str
) -> None:
    bad = with_stream(compressed, damage(stream_of(compressed), compressed.size))  # type: ignore[operator]
    for check in (validate, decode):
        with pytest.raises(CodecError, match=message):
            check(bad)


def test_a_stream_inflates_no_further_than_its_tensor(compressed: EncodedTensor) -> None:
    # 100 MB of zeros compress to a few hundred bytes; decoding must stop at the tensor's size.
    bomb = with_stream(compressed, bz2.compress(bytes(100_000_000)))
    with pytest.raises(CodecError, match="does not end after 51200 bytes"):
        decode(bomb)


def test_payload_shorter_than_its_radii_is_refused(compressed: EncodedTensor) -> None:
    with pytest.raises(CodecError, match="shorter than 800 of radii"):
        validate(dataclasses.replace(compressed, data=compressed.data[:10]))


def test_bbit_uploads_go_compressed_and_the_master_accepts_only_its_own_grid() -> None:
    update = [sparse_update(), np.zeros(8, np.float32)]
    shapes = [u.shape for u in update]
    rng = np.random.default_rng(0)
    sent = wire_form(quantize_update("bbit", update, 3, rng, bbit_block=256))
    assert [t.codec for t in sent] == [Codec.BLOCK_GRID_BZ2, Codec.BLOCK_GRID]
    check_upload("bbit", 3, sent, shapes, bbit_block=256)
    laq = wire_form(quantize_update("bbit", update, 3, rng))
    assert laq[0].codec is Codec.LAQ_GRID_BZ2
    check_upload("bbit", 3, laq, shapes)
    with pytest.raises(ValueError, match="codec LAQ_GRID_BZ2, mode bbit sends BLOCK_GRID"):
        check_upload("bbit", 3, laq, shapes, bbit_block=256)


def test_a_worker_sends_the_compressed_form_and_keeps_exactly_what_the_master_decodes() -> None:
    shapes = [(400, 128), (8,)]
    lazy = LazyParams(thr_scale=0.0, warmup=0)
    reference = UploadReference(
        shapes, UploadSettings(mode="bbit", b_up=3, bbit_block=256, lazy=lazy)
    )
    rng = np.random.default_rng(0)
    prepared = reference.prepare([sparse_update(), np.zeros(8, np.float32)], 0, rng)
    assert [t.codec for t in prepared.encoded] == [Codec.BLOCK_GRID_BZ2, Codec.BLOCK_GRID]
    for sent, kept in zip(prepared.encoded, prepared.delta, strict=True):
        assert np.array_equal(decode(sent, kept.shape), kept)


def test_a_bad_header_names_the_compressed_codec() -> None:
    missing_block = EncodedTensor(Codec.BLOCK_GRID_BZ2, (4,), 3, (), b"")
    with pytest.raises(CodecError, match=r"expected 1 \(\['block'\]\) for BLOCK_GRID_BZ2$"):
        validate(missing_block)

"""Bit packing: identity for every width, the documented bit order, and refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flq.codec import CodecError, bitpack, pack_bits, packed_size, unpack_bits

ALL_BITS = range(1, 17)
LENGTHS = (0, 1, 7, 8, 9, 1000)


def reference_pack(values: np.ndarray, bits: int) -> bytes:
    """The documented order spelled out bit by bit: value i's bit j is stream bit i*bits + j,
    stream bit k is bit k % 8 of byte k // 8."""
    stream = (values.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(stream.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def random_values(count: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size=count, dtype=np.uint32)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("count", LENGTHS)
def test_pack_matches_documented_order_and_round_trips(bits: int, count: int) -> None:
    values = random_values(count, bits, seed=bits * 1000 + count)
    packed = pack_bits(values, bits)
    assert packed == reference_pack(values, bits)
    assert len(packed) == packed_size(count, bits)
    unpacked = unpack_bits(packed, bits, count)
    assert unpacked.dtype == (np.uint8 if bits <= 8 else np.uint16)
    np.testing.assert_array_equal(unpacked, values)


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(1, 16),
    count=st.sampled_from(LENGTHS) | st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_identity(bits: int, count: int, seed: int) -> None:
    values = random_values(count, bits, seed)
    packed = pack_bits(values, bits)
    assert packed == reference_pack(values, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_blocks_join_seamlessly(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks make every block boundary (and a short last block) happen in a short array.
    monkeypatch.setattr(bitpack, "BLOCK_VALUES", 16)
    values = random_values(16 * 5 + 3, bits, seed=bits)
    packed = pack_bits(values, bits)
    assert packed == reference_pack(values, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, values.size), values)


@pytest.mark.parametrize("bits", [3, 8, 12])
def test_real_block_size_boundary(bits: int) -> None:
    values = random_values(bitpack.BLOCK_VALUES + 5, bits, seed=7)
    packed = pack_bits(values, bits)
    assert packed == reference_pack(values, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, values.size), values)


@pytest.mark.parametrize(
    ("bits", "values", "expected"),
    [
        # b=1: values 1,0,1,1,0,0,0,0 -> bits 0..7 of byte 0 = 0b00001101; the ninth in byte 1.
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], b"\x0d\x01"),
        # b=2: 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 0x39.
        (2, [1, 2, 3, 0], b"\x39"),
        # b=3: 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 = 0x1F58D1, little-endian bytes.
        (3, [1, 2, 3, 4, 5, 6, 7, 0], b"\xd1\x58\x1f"),
        # b=3, three 7s: 9 ones then zero pad bits: 0xFF, 0x01.
        (3, [7, 7, 7], b"\xff\x01"),
        # b=4: low nibble first.
        (4, [0x1, 0x2, 0xA], b"\x21\x0a"),
        # b=5: 31<<5 = 0x3E0 -> 0xE0 0x03.
        (5, [0, 31], b"\xe0\x03"),
        (8, [0, 1, 255, 128], b"\x00\x01\xff\x80"),
        # b=12: 0xABC | 0x123<<12 = 0x123ABC.
        (12, [0xABC, 0x123], b"\xbc\x3a\x12"),
        # b=16: little-endian uint16.
        (16, [0x1234, 0xFFFF], b"\x34\x12\xff\xff"),
    ],
)
def test_exact_bytes(bits: int, values: list[int], expected: bytes) -> None:
    assert pack_bits(np.array(values), bits) == expected
    np.testing.assert_array_equal(unpack_bits(expected, bits, len(values)), values)


def test_two_bit_fast_path_on_every_byte() -> None:
    # The 2-bit path multiplies; every one of the 256 groups of four values must come out exact.
    groups = np.array(list(itertools.product(range(4), repeat=4)), dtype=np.uint8)
    values = groups.reshape(-1)
    assert pack_bits(values, 2) == reference_pack(values, 2)
    assert sorted(pack_bits(values, 2)) == list(range(256))


def test_unpack_accepts_memoryview_and_bytearray() -> None:
    values = random_values(100, 5, seed=3)
    packed = pack_bits(values, 5)
    np.testing.assert_array_equal(unpack_bits(memoryview(packed), 5, 100), values)
    np.testing.assert_array_equal(unpack_bits(bytearray(packed), 5, 100), values)


def test_pack_accepts_any_shape_and_leaves_input_alone() -> None:
    values = random_values(24, 6, seed=5).reshape(2, 3, 4).astype(np.uint8)
    before = values.copy()
    packed = pack_bits(values, 6)
    np.testing.assert_array_equal(values, before)
    np.testing.assert_array_equal(unpack_bits(packed, 6, 24), before.reshape(-1))


def test_packed_size() -> None:
    assert [packed_size(n, 3) for n in (0, 1, 2, 3, 8, 10)] == [0, 1, 1, 2, 3, 4]
    assert packed_size(5, 16) == 10


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_bad_width_is_refused(bits: int) -> None:
    with pytest.raises(CodecError, match=r"^bits: got"):
        pack_bits(np.zeros(4, dtype=np.uint8), bits)
    with pytest.raises(CodecError, match=r"^bits: got"):
        unpack_bits(b"\x00", bits, 1)


def test_wrong_payload_length_names_field_and_expectation() -> None:
    with pytest.raises(CodecError) as info:
        unpack_bits(b"\x00\x00\x00", 3, 10)
    assert str(info.value) == "payload length: got 3 bytes, expected 4 (= ceil(10*3/8))"
    with pytest.raises(CodecError, match="payload length: got 5 bytes, expected 4"):
        unpack_bits(bytes(5), 3, 10)


@pytest.mark.parametrize(
    "values",
    [np.array([0, 8]), np.array([-1, 0]), np.array([0.5, 1.0])],
    ids=["too-large", "negative", "float"],
)
def test_values_that_do_not_fit_are_refused(values: np.ndarray) -> None:
    with pytest.raises(CodecError, match=r"^values: got"):
        pack_bits(values, 3)

"""Quantizers: error bounds, unbiasedness, exact costs, and a CodecError for every bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flq.codec import (
    HEADER_FIXED_BITS,
    Codec,
    CodecError,
    EncodedTensor,
    decode,
    encode,
    encode_block_grid,
    encode_float16,
    encode_float32,
    encode_laq_grid,
    encode_sign,
    encode_stochastic,
    header_bits,
    packed_size,
    quantizers,
    unpack_bits,
    validate,
)

FLOAT32_EPS = float(np.finfo(np.float32).eps)
SMALLEST_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
SHAPES = [(), (0,), (3, 0), (1,), (7,), (3, 5, 7)]

# (codec, bits) pairs covering every codec; used where any codec will do.
EVERY_CODEC = [
    (Codec.FLOAT32, 32),
    (Codec.FLOAT16, 16),
    (Codec.STOCHASTIC, 8),
    (Codec.STOCHASTIC, 3),
    (Codec.LAQ_GRID, 1),
    (Codec.LAQ_GRID, 5),
    (Codec.LAQ_GRID, 16),
    (Codec.SIGN, 1),
    (Codec.BLOCK_GRID, 2),
    (Codec.BLOCK_GRID, 9),
]


def encode_any(codec: Codec, x: np.ndarray, bits: int, seed: int = 0) -> EncodedTensor:
    return encode(codec, x, bits, np.random.default_rng(seed))


def grid_bound(radius: float, bits: int) -> float:
    """tau*R, plus the float32 rounding of t and of q*step - R (a few ulps of R)."""
    return radius / ((1 << bits) - 1) + 8 * FLOAT32_EPS * radius + SMALLEST_SUBNORMAL


# ---------------------------------------------------------------- the codec enum


def test_codec_values_are_the_wire_values() -> None:
    assert {c.name: c.value for c in Codec} == {
        "FLOAT32": 1,
        "FLOAT16": 2,
        "STOCHASTIC": 3,
        "LAQ_GRID": 4,
        "SIGN": 5,
        "BLOCK_GRID": 6,
        "SPARSE_TERNARY": 7,
        "SPARSE_TERNARY_GAPCLASS": 8,
        "BLOCK_GRID_BZ2": 9,
        "LAQ_GRID_BZ2": 10,
    }


# ---------------------------------------------------------------- LAQ grid


@pytest.mark.parametrize("bits", range(1, 17))
def test_laq_grid_error_within_tau_r_for_every_width(bits: int) -> None:
    v = np.random.default_rng(bits).standard_normal(5000).astype(np.float32)
    enc = encode_laq_grid(v, bits)
    radius = enc.scales[0]
    assert radius == float(np.abs(v).max())
    error = np.abs(decode(enc).astype(np.float64) - v)
    assert error.max() <= grid_bound(radius, bits)
    # A grid that is coarser than promised would fail the bound; one that wastes levels would
    # not reach it: the worst error is close to tau*R.
    assert error.max() >= 0.5 * radius / ((1 << bits) - 1)


@settings(max_examples=120, deadline=None)
@given(
    bits=st.integers(1, 16),
    v=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
        elements=st.floats(-(2.0**99), 2.0**99, width=32),
    ),
    exponent=st.integers(-44, 8),
)
def test_laq_grid_error_bound_and_index_formula(bits: int, v: np.ndarray, exponent: int) -> None:
    v = (v * np.float32(10.0**exponent)).astype(np.float32)  # reach tiny and subnormal radii
    enc = encode_laq_grid(v, bits)
    radius, levels = enc.scales[0], (1 << bits) - 1
    decoded = decode(enc, v.shape)
    assert decoded.shape == v.shape and decoded.dtype == np.float32
    assert np.all(np.abs(decoded.astype(np.float64) - v) <= grid_bound(radius, bits))
    q = unpack_bits(enc.data, bits, v.size).astype(np.float64)
    assert q.size == 0 or (q.min() >= 0 and q.max() <= levels)
    if radius > 0:
        # q is floor((v + R)/(2 tau R) + 1/2): the nearest grid index, up to float32 rounding.
        exact = (v.reshape(-1).astype(np.float64) + radius) * levels / (2 * radius)
        assert np.all(np.abs(q - exact) <= 0.5 + 1e-5 * levels + 1e-6)


def test_laq_grid_all_zero_decodes_to_exact_zeros() -> None:
    v = np.array([0.0, -0.0, 0.0], dtype=np.float32)
    enc = encode_laq_grid(v, 4)
    assert enc.scales == (0.0,)
    assert enc.data == bytes(packed_size(3, 4))
    decoded = decode(enc)
    np.testing.assert_array_equal(decoded, np.zeros(3, dtype=np.float32))
    assert not np.signbit(decoded).any()


def test_laq_grid_ends_of_range_are_exact() -> None:
    v = np.array([-3.0, 3.0, 0.5], dtype=np.float32)
    decoded = decode(encode_laq_grid(v, 8))
    assert decoded[0] == -3.0 and decoded[1] == 3.0


def test_laq_grid_one_bit_is_plus_or_minus_r_by_sign() -> None:
    v = np.array([0.5, -2.0, 0.0, -0.0, -1e-30, 1e-30, 2.0], dtype=np.float32)
    decoded = decode(encode_laq_grid(v, 1))
    np.testing.assert_array_equal(decoded, [2, -2, 2, 2, -2, 2, 2])


@pytest.mark.parametrize("radius", [3.0e38, 1.0e-38, 1.0e-44])
def test_laq_grid_extreme_radii_stay_finite_and_within_bound(radius: float) -> None:
    v = (np.linspace(-1.0, 1.0, 101) * radius).astype(np.float32)
    for bits in (1, 4, 16):
        enc = encode_laq_grid(v, bits)
        decoded = decode(enc)
        assert np.isfinite(decoded).all()
        assert np.all(np.abs(decoded.astype(np.float64) - v) <= grid_bound(enc.scales[0], bits))


# ---------------------------------------------------------------- stochastic rounding


def mean_of_many_draws(
    encoder_bits: int, x: np.ndarray, draws: int, laq: bool
) -> tuple[np.ndarray, float]:
    """Mean of `draws` independent encodings of x (one long tiled call) and the grid step."""
    tiled = np.tile(x, draws)  # max|x| is the same in every copy, so one grid for all
    rng = np.random.default_rng(2024)
    enc = (
        encode_laq_grid(tiled, encoder_bits, rng)
        if laq
        else encode_stochastic(tiled, encoder_bits, rng)
    )
    step = 2 * enc.scales[0] / ((1 << encoder_bits) - 1)
    return decode(enc).reshape(draws, x.size).astype(np.float64).mean(axis=0), step


@pytest.mark.parametrize("laq", [False, True], ids=["stochastic", "laq-stochastic"])
@pytest.mark.parametrize("bits", [1, 2, 8, 16])
def test_stochastic_rounding_is_unbiased(bits: int, laq: bool) -> None:
    x = np.random.default_rng(bits).uniform(-1.0, 1.0, 64).astype(np.float32)
    x[0] = 1.0  # pins the scale
    draws = 4000
    mean, step = mean_of_many_draws(bits, x, draws, laq)
    # Each draw is one of two neighbouring levels: sigma <= step/2 per draw. 5 sigma of the mean
    # (64 coordinates: a false alarm is ~1e-5) plus float32 rounding.
    tolerance = 5 * (step / 2) / math.sqrt(draws) + 1e-6
    assert np.all(np.abs(mean - x) <= tolerance)


def test_stochastic_rounding_really_rounds_both_ways() -> None:
    # Deterministic rounding would pass an error bound but not this: 0.3 of a step up from a
    # level must round up about 30% of the time.
    bits, draws = 2, 20000
    step = 2.0 / 3.0
    x = np.array([1.0, -1.0 + 0.3 * step], dtype=np.float32)
    decoded = decode(encode_stochastic(np.tile(x, draws), bits, np.random.default_rng(5)))
    rounded_up = np.mean(decoded.reshape(draws, 2)[:, 1] > x[1])
    assert abs(rounded_up - 0.3) < 5 * math.sqrt(0.3 * 0.7 / draws)


def test_stochastic_error_is_below_one_step_and_scale_is_max_abs() -> None:
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32)
    enc = encode_stochastic(x, 8, np.random.default_rng(2))
    assert enc.codec is Codec.STOCHASTIC and enc.bits == 8
    assert enc.scales == (float(np.abs(x).max()),)
    step = 2 * enc.scales[0] / 255
    assert np.abs(decode(enc) - x).max() <= step * (1 + 1e-5)


def test_stochastic_same_seed_same_bytes() -> None:
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    first = encode_stochastic(x, 4, np.random.default_rng(9))
    second = encode_stochastic(x, 4, np.random.default_rng(9))
    assert first == second


# ---------------------------------------------------------------- sign


def test_sign_decodes_to_mean_abs_times_sign_with_ties_to_plus() -> None:
    v = np.array([1.5, -2.0, 0.0, -0.0, 3.0, -0.5, 0.25], dtype=np.float32)
    enc = encode_sign(v)
    s = float(np.abs(v.astype(np.float64)).mean())
    assert enc.scales[0] == pytest.approx(s, rel=1e-6)
    expected = np.where(v >= 0, np.float32(enc.scales[0]), -np.float32(enc.scales[0]))
    np.testing.assert_array_equal(decode(enc), expected)
    assert decode(enc)[2] > 0 and decode(enc)[3] > 0  # both zeros go to +s


@settings(max_examples=60, deadline=None)
@given(
    v=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=40),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
def test_sign_matches_definition(v: np.ndarray) -> None:
    enc = encode_sign(v)
    s = np.float32(enc.scales[0])
    assert float(s) == pytest.approx(
        float(np.abs(v.astype(np.float64)).mean()) if v.size else 0.0, rel=1e-5
    )
    np.testing.assert_array_equal(decode(enc), np.where(v >= 0, s, -s).astype(np.float32))


def test_sign_with_huge_values_stays_finite() -> None:
    v = np.array([3.0e38, -3.0e38, 3.0e38], dtype=np.float32)
    decoded = decode(encode_sign(v))
    assert np.isfinite(decoded).all()
    np.testing.assert_array_equal(np.sign(decoded), [1, -1, 1])


# ---------------------------------------------------------------- floats


def test_float32_round_trip_is_exact() -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    enc = encode_float32(x)
    assert enc.data == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(decode(enc, (4, 6)), x)


def test_float16_round_trip_equals_numpy_cast() -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    x[:3] = [65504.0, -65519.0, 1e-7]  # largest half, one that rounds to it, a subnormal half
    decoded = decode(encode_float16(x))
    np.testing.assert_array_equal(decoded, x.astype(np.float16).astype(np.float32))


def test_float16_refuses_values_that_overflow() -> None:
    with pytest.raises(CodecError, match=r"^input: got max \|x\| = 70000"):
        encode_float16(np.array([1.0, -70000.0], dtype=np.float32))


# ---------------------------------------------------------------- every codec


@pytest.mark.parametrize(("codec", "bits"), EVERY_CODEC)
@pytest.mark.parametrize("shape", SHAPES)
def test_payload_size_cost_and_shape(codec: Codec, bits: int, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    enc = encode_any(codec, x, bits)
    assert enc.codec is codec and enc.bits == bits and enc.shape == shape
    assert enc.size == math.prod(shape)
    blocks = -(-x.size // 256)  # encode()'s default block size
    expected_bytes = {
        Codec.FLOAT32: 4 * x.size,
        Codec.FLOAT16: 2 * x.size,
        Codec.BLOCK_GRID: 4 * blocks + packed_size(x.size, bits),
    }.get(codec, packed_size(x.size, bits))
    assert len(enc.data) == expected_bytes
    assert enc.cost_bits() == 8 * len(enc.data) + header_bits(len(shape), len(enc.scales))
    validate(enc, shape)
    decoded = decode(enc, shape)
    assert decoded.shape == shape and decoded.dtype == np.float32


def test_header_bits() -> None:
    assert HEADER_FIXED_BITS == 16
    assert header_bits(0, 0) == 16
    assert header_bits(2, 1) == 16 + 64 + 32
    enc = encode_laq_grid(np.ones((10, 3), dtype=np.float32), 3)
    assert enc.cost_bits() == 8 * 12 + 16 + 2 * 32 + 32


@pytest.mark.parametrize(("codec", "bits"), EVERY_CODEC)
def test_encoders_leave_input_alone_and_accept_read_only_and_other_dtypes(
    codec: Codec, bits: int
) -> None:
    x = np.random.default_rng(3).standard_normal(300)
    x.setflags(write=False)
    before = x.copy()
    from_float64 = encode_any(codec, x, bits)
    np.testing.assert_array_equal(x, before)
    assert from_float64 == encode_any(codec, x.astype(np.float32), bits)
    integers = encode_any(codec, np.arange(-5, 5), bits)
    assert decode(integers).shape == (10,)


def test_decoded_array_is_writable_and_independent_of_payload() -> None:
    enc = encode_float32(np.ones(3, dtype=np.float32))
    decoded = decode(enc)
    decoded[0] = 5.0
    np.testing.assert_array_equal(decode(enc), np.ones(3, dtype=np.float32))


def test_encode_dispatch_matches_the_named_encoders() -> None:
    x = np.random.default_rng(4).standard_normal(50).astype(np.float32)
    assert encode(Codec.FLOAT32, x, 32) == encode_float32(x)
    assert encode(Codec.FLOAT16, x, 16) == encode_float16(x)
    assert encode(Codec.SIGN, x, 1) == encode_sign(x)
    assert encode(Codec.LAQ_GRID, x, 6) == encode_laq_grid(x, 6)
    assert encode(Codec.STOCHASTIC, x, 6, np.random.default_rng(1)) == encode_stochastic(
        x, 6, np.random.default_rng(1)
    )


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("codec", "bits"), EVERY_CODEC)
def test_non_finite_input_is_refused(codec: Codec, bits: int, bad: float) -> None:
    x = np.ones(10, dtype=np.float32)
    x[7] = bad
    with pytest.raises(CodecError, match=r"^input: contains NaN or Inf \(1 of 10 values\)"):
        encode_any(codec, x, bits)


@pytest.mark.parametrize("bits", [0, 17])
def test_bad_width_is_refused_by_encoders(bits: int) -> None:
    x = np.ones(4, dtype=np.float32)
    with pytest.raises(CodecError, match=r"^bits: got .*, expected 1\.\.16 for LAQ_GRID"):
        encode_laq_grid(x, bits)
    with pytest.raises(CodecError, match=r"^bits: got .*, expected 1\.\.16 for STOCHASTIC"):
        encode_stochastic(x, bits, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("codec", "bits"), [(Codec.FLOAT32, 16), (Codec.FLOAT16, 32), (Codec.SIGN, 2)]
)
def test_fixed_width_codecs_refuse_other_widths(codec: Codec, bits: int) -> None:
    with pytest.raises(CodecError, match=rf"^bits: got {bits}, expected \d+ for {codec.name}"):
        encode(codec, np.ones(3), bits)


def test_stochastic_without_rng_is_refused() -> None:
    with pytest.raises(CodecError, match=r"^rng: got None"):
        encode(Codec.STOCHASTIC, np.ones(3), 8)


# ---------------------------------------------------------------- block grid


def block_radii(v: np.ndarray, block: int) -> np.ndarray:
    """R_j per value: max |v| over the block the value sits in."""
    flat = np.abs(v.reshape(-1).astype(np.float64))
    starts = np.arange(0, flat.size, block)
    peaks = np.maximum.reduceat(flat, starts) if flat.size else flat
    return np.repeat(peaks, block)[: flat.size]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 9, 16])
@pytest.mark.parametrize(("count", "block"), [(1000, 64), (1000, 1000), (257, 256), (5, 256)])
def test_block_grid_error_within_half_a_step_of_its_block(
    bits: int, count: int, block: int
) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    v = (rng.standard_t(3, size=count) * rng.choice([1e-3, 1.0, 50.0], size=count)).astype(
        np.float32
    )
    decoded = decode(encode_block_grid(v, bits, block))
    radii = block_radii(v, block)
    step = radii / ((1 << (bits - 1)) - 1)
    # half a step, plus the float32 rounding of v*L/R and of q*R/L (a few ulps of R)
    assert (np.abs(decoded - v) <= step / 2 + 8 * FLOAT32_EPS * radii + SMALLEST_SUBNORMAL).all()


def test_block_grid_sends_zero_exactly_and_each_block_keeps_its_own_scale() -> None:
    v = np.zeros(64, dtype=np.float32)
    v[3], v[40] = 1000.0, 0.001  # two blocks of 32 with radii six orders apart
    decoded = decode(encode_block_grid(v, 2, 32))
    expected = np.zeros(64, dtype=np.float32)
    expected[3], expected[40] = 1000.0, 0.001
    np.testing.assert_array_equal(decoded, expected)
    # the LAQ grid at the same width cannot: no level at 0, one radius for the tensor
    assert np.count_nonzero(decode(encode_laq_grid(v, 2))) == 64


def test_block_grid_payload_is_radii_then_offset_indices() -> None:
    v = np.array([-2.0, 0.0, 1.0, 2.0, 0.5, -0.5], dtype=np.float32)
    enc = encode_block_grid(v, 3, 4)  # L = 3; blocks [-2, 0, 1, 2] and [0.5, -0.5]
    assert enc.codec is Codec.BLOCK_GRID and enc.scales == (4.0,)
    radii = np.frombuffer(enc.data[:8], dtype="<f4")
    np.testing.assert_array_equal(radii, [2.0, 0.5])
    indices = unpack_bits(enc.data[8:], 3, 6)
    np.testing.assert_array_equal(indices, [0, 3, 5, 6, 6, 0])  # round(v*3/R) + 3
    assert enc.cost_bits() == 8 * (8 + packed_size(6, 3)) + header_bits(1, 1)


def test_block_grid_stochastic_rounding_is_unbiased_and_rounds_both_ways() -> None:
    v = np.full(4096, 0.3, dtype=np.float32)
    v[0] = 1.0  # radius 1 with b=2: levels -1, 0, 1, so 0.3 rounds to 0 or 1
    draws = np.stack(
        [decode(encode_block_grid(v, 2, 4096, np.random.default_rng(s))) for s in range(64)]
    )
    assert set(np.unique(draws[:, 1:])) == {0.0, 1.0}
    assert abs(float(draws[:, 1:].mean()) - 0.3) < 0.01


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda d: d[:-1], r"^payload length: got 9 bytes, expected 10 \(= 2 block radii"),
        (lambda d: d[:4] + np.float32(np.nan).tobytes() + d[8:], r"^payload radii: got NaN"),
        (lambda d: np.float32(-1).tobytes() + d[4:], r"^payload radii: got -1\.0, expected >= 0"),
        (lambda d: d[:8] + b"\xff\xff", r"^payload values: got index 3, expected 0\.\.2"),
    ],
)
def test_block_grid_malformed_payloads_are_refused(data: object, message: str) -> None:
    good = encode_block_grid(np.arange(8, dtype=np.float32) - 3.5, 2, 4)
    bad = dataclasses.replace(good, data=data(good.data))  # type: ignore[operator]
    with pytest.raises(CodecError, match=message):
        validate(bad)
    with pytest.raises(CodecError, match=message):
        decode(bad)


@pytest.mark.parametrize("block", [0, -4, 2.5, math.nan, 2.0**25])
def test_block_grid_block_size_is_checked_on_both_sides(block: float) -> None:
    good = encode_block_grid(np.ones(8, dtype=np.float32), 2, 4)
    with pytest.raises(CodecError, match=r"^scales\[block\]: got .*, expected an int in 1\.\."):
        validate(dataclasses.replace(good, scales=(block,)))
    if float(block).is_integer():
        with pytest.raises(CodecError, match=r"^scales\[block\]"):
            encode_block_grid(np.ones(8, dtype=np.float32), 2, int(block))


def test_block_grid_needs_two_bits() -> None:
    with pytest.raises(CodecError, match=r"^bits: got 1, expected 2\.\.16 for BLOCK_GRID"):
        encode_block_grid(np.ones(8, dtype=np.float32), 1, 4)


def good_laq() -> EncodedTensor:
    return encode_laq_grid(np.arange(10, dtype=np.float32) - 4.5, 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bits": 0}, r"^bits: got 0, expected 1\.\.16 for LAQ_GRID"),
        ({"bits": 17}, r"^bits: got 17, expected 1\.\.16 for LAQ_GRID"),
        (
            {"data": b"\x00\x00\x00"},
            r"^payload length: got 3 bytes, expected 4 \(= ceil\(10\*3/8\)\)",
        ),
        ({"data": bytes(5)}, r"^payload length: got 5 bytes, expected 4"),
        ({"scales": (math.nan,)}, r"^scales\[R\]: got nan, expected a finite number"),
        ({"scales": (math.inf,)}, r"^scales\[R\]: got inf, expected a finite number"),
        ({"scales": (-1.0,)}, r"^scales\[R\]: got -1\.0, expected >= 0"),
        ({"scales": (1e39,)}, r"^scales\[R\]: got 1e\+39, expected to fit float32"),
        ({"scales": ()}, r"^scales: got 0 values, expected 1 \(\['R'\]\) for LAQ_GRID"),
        ({"scales": (1.0, 2.0)}, r"^scales: got 2 values, expected 1"),
        ({"shape": (10, -1)}, r"^shape: got \(10, -1\), expected a tuple of ints >= 0"),
        ({"shape": (2.5,)}, r"^shape: got \(2\.5,\), expected a tuple of ints"),
        ({"codec": 99}, r"^codec: got 99, expected one of FLOAT32=1, .*LAQ_GRID_BZ2=10"),
    ],
)
def test_malformed_tensors_are_refused_by_validate_and_decode(
    changes: dict[str, object], message: str
) -> None:
    bad = dataclasses.replace(good_laq(), **changes)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=message):
        validate(bad)
    with pytest.raises(CodecError, match=message):
        decode(bad)


def test_shape_must_match_expected_shape() -> None:
    enc = good_laq()
    validate(enc, (10,))
    with pytest.raises(CodecError, match=r"^shape: got \(10,\), expected \(2, 5\)"):
        decode(enc, (2, 5))
    reshaped = dataclasses.replace(enc, shape=(2, 5))
    with pytest.raises(CodecError, match=r"^shape: got \(2, 5\), expected \(10,\)"):
        validate(reshaped, (10,))


@pytest.mark.parametrize(("codec", "bits"), [(Codec.FLOAT32, 32), (Codec.FLOAT16, 16)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_payload_with_nan_or_inf_is_refused(codec: Codec, bits: int, bad: float) -> None:
    enc = encode_any(codec, np.ones(6, dtype=np.float32), bits)
    dtype = "<f4" if codec is Codec.FLOAT32 else "<f2"
    values = np.frombuffer(enc.data, dtype=dtype).copy()
    values[4] = bad
    tampered = dataclasses.replace(enc, data=values.tobytes())
    with pytest.raises(CodecError, match=r"^payload values: got 1 NaN or Inf of 6"):
        validate(tampered)
    with pytest.raises(CodecError, match=r"^payload values"):
        decode(tampered)


@pytest.mark.parametrize(("codec", "bits"), [(Codec.FLOAT32, 32), (Codec.FLOAT16, 16)])
def test_float_payload_length_is_checked(codec: Codec, bits: int) -> None:
    enc = encode_any(codec, np.ones(6, dtype=np.float32), bits)
    with pytest.raises(
        CodecError, match=r"^payload length: got .* bytes, expected .* \(= 6 values"
    ):
        validate(dataclasses.replace(enc, data=enc.data[:-1]))


def test_sign_scale_must_be_a_magnitude() -> None:
    enc = encode_sign(np.ones(4, dtype=np.float32))
    with pytest.raises(CodecError, match=r"^scales\[s\]: got -1\.0, expected >= 0"):
        validate(dataclasses.replace(enc, scales=(-1.0,)))
    with pytest.raises(CodecError, match=r"^scales: got 2 values, expected 1 \(\['s'\]\) for SIGN"):
        validate(dataclasses.replace(enc, scales=(1.0, 1.0)))


def test_floats_take_no_scales() -> None:
    enc = encode_float32(np.ones(2, dtype=np.float32))
    with pytest.raises(CodecError, match=r"^scales: got 1 values, expected 0"):
        validate(dataclasses.replace(enc, scales=(1.0,)))


def test_block_boundaries_do_not_show(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(8).standard_normal(1000).astype(np.float32)
    widths = (1, 3, 8, 11, 16)
    encoded = {bits: encode_laq_grid(x, bits) for bits in widths}
    decoded = {bits: decode(enc) for bits, enc in encoded.items()}
    sign = encode_sign(x)
    monkeypatch.setattr(quantizers, "BLOCK_VALUES", 64)  # 1000 = 15 blocks + a short one
    for bits in widths:
        assert encode_laq_grid(x, bits) == encoded[bits]
        np.testing.assert_array_equal(decode(encoded[bits]), decoded[bits])
    assert encode_sign(x).data == sign.data
    np.testing.assert_array_equal(
        decode(sign), np.where(x >= 0, 1, -1) * np.float32(sign.scales[0])
    )

"""The codec table: one spec per codec, dispatch through it, and the size bound it promises."""

from __future__ import annotations

import numpy as np
import pytest

from flq.codec import SPECS, Codec, CodecError, decode, encode, payload_bytes, validate
from flq.codec.registry import spec_of


def test_every_codec_has_exactly_its_own_spec() -> None:
    assert set(SPECS) == set(Codec)
    assert all(spec.codec is codec for codec, spec in SPECS.items())


@pytest.mark.parametrize("codec", list(Codec))
def test_each_spec_round_trips_within_its_size_bound(codec: Codec) -> None:
    spec = SPECS[codec]
    x = np.random.default_rng(3).standard_normal((17, 5)).astype(np.float32)
    enc = encode(codec, x, spec.max_bits, np.random.default_rng(0))
    validate(enc, x.shape)
    assert len(enc.data) <= payload_bytes(codec, enc.bits, x.size, enc.scales)
    decoded = decode(enc, x.shape)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    assert np.all(np.isfinite(decoded))


@pytest.mark.parametrize("bad", [0, 99, "SIGN", None])
def test_unknown_codec_is_refused_with_the_valid_ids(bad: object) -> None:
    with pytest.raises(CodecError, match=r"^codec: got .*expected one of FLOAT32=1"):
        spec_of(bad)


def test_bits_outside_a_spec_are_refused_before_encoding() -> None:
    with pytest.raises(CodecError, match=r"^bits: got 2, expected 1 for SIGN"):
        encode(Codec.SIGN, np.ones(4, np.float32), 2)

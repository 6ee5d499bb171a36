"""The codec table: one spec per codec (encode, decode, payload size, validation rule).

Adding a codec is one row in SPECS plus its value in flq.codec.Codec and the proto enum
(flq/serde.py checks at import that the enum and this table agree). Everything that dispatches on
a codec (encode, decode, validate, the chunk reassembler's size bound) reads this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flq.codec import blockgrid, gapclass, lossless, quantizers, sparse
from flq.codec.bitpack import MAX_BITS, MIN_BITS, check_payload, packed_size
from flq.codec.errors import CodecError
from flq.codec.tensor import Codec, EncodedTensor


@dataclass(frozen=True)
class EncodeOptions:
    """What `encode` may pass a codec; each codec reads the fields it needs."""

    bits: int
    rng: np.random.Generator | None = None
    block: int = 256  # BLOCK_GRID: values per radius
    density: float = 0.01  # SPARSE_TERNARY: fraction of values kept


Scales = tuple[float, ...]


@dataclass(frozen=True)
class CodecSpec:
    """Everything about one codec.

    `max_payload_bytes(bits, count, scales)` is what a header lets a receiver expect before the
    payload arrives: the exact size for fixed-size codecs, an upper bound for variable-length
    ones (whose `check_payload` then parses the payload to check its exact length).
    """

    codec: Codec
    min_bits: int
    max_bits: int
    scale_names: tuple[str, ...]
    encode: Callable[[np.ndarray, EncodeOptions], EncodedTensor]
    decode: Callable[[EncodedTensor], np.ndarray]  # flat float32; the tensor is validated
    max_payload_bytes: Callable[[int, int, Scales], int]
    check_payload: Callable[[EncodedTensor], None]
    check_scales: Callable[[Codec, tuple[str, ...], Scales], None] = quantizers.check_magnitudes
    # True where `decode` checks the payload itself while parsing it (variable-length codes), so
    # a decode parses once rather than once to check and once to decode.
    decode_checks_payload: bool = False

    def check_bits(self, bits: object) -> None:
        quantizers.check_bits_in(self.codec, bits, self.min_bits, self.max_bits)


# ---------------------------------------------------------------- the dense codecs' rows


def _float_spec(
    codec: Codec, bits: int, encoder: Callable[[np.ndarray], EncodedTensor]
) -> CodecSpec:
    itemsize = quantizers.FLOAT_DTYPES[codec].itemsize
    return CodecSpec(
        codec=codec,
        min_bits=bits,
        max_bits=bits,
        scale_names=(),
        encode=lambda x, _options: encoder(x),
        decode=lambda enc: quantizers.float_values(enc.data, codec),
        max_payload_bytes=lambda _bits, count, _scales: count * itemsize,
        check_payload=lambda enc: quantizers.check_float_payload(
            enc.data, quantizers.FLOAT_DTYPES[codec], enc.size
        ),
    )


def _packed_payload(enc: EncodedTensor) -> None:
    check_payload(len(enc.data), enc.bits, enc.size)


def _packed_bytes(bits: int, count: int, _scales: Scales) -> int:
    return packed_size(count, bits)


def _grid_decode(enc: EncodedTensor) -> np.ndarray:
    return quantizers.grid_values(enc.data, enc.bits, enc.size, enc.scales[0])


def _encode_stochastic(x: np.ndarray, options: EncodeOptions) -> EncodedTensor:
    if options.rng is None:
        raise CodecError("rng: got None, expected a numpy Generator for STOCHASTIC")
    return quantizers.encode_stochastic(x, options.bits, options.rng)


def _block_scales(codec: Codec, names: tuple[str, ...], scales: Scales) -> None:
    if len(scales) != len(names):
        raise CodecError(
            f"scales: got {len(scales)} values, expected {len(names)} ({list(names)}) "
            f"for {codec.name}"
        )
    blockgrid.check_block(scales[0])


def _block_payload_bytes(bits: int, count: int, scales: Scales) -> int:
    _block_scales(Codec.BLOCK_GRID, ("block",), scales)  # the size depends on the block
    return blockgrid.payload_size(count, bits, int(scales[0]))


def _sparse_spec(
    codec: Codec, min_bits: int, max_bits: int, max_bytes: Callable[[int, int, Scales], int]
) -> CodecSpec:
    """A sparse ternary code: the encoder sends whichever position code is smaller, and the
    payload check reads the scales (mu, nnz) while it parses."""
    return CodecSpec(
        codec=codec,
        min_bits=min_bits,
        max_bits=max_bits,
        scale_names=("mu", "nnz"),
        encode=lambda x, o: sparse.encode_sparse_ternary(x, o.density),
        decode=sparse.decode_ternary,
        max_payload_bytes=max_bytes,
        check_payload=sparse.check_ternary,
        check_scales=lambda _codec, _names, _scales: None,
        decode_checks_payload=True,
    )


def _compressed_spec(base: CodecSpec) -> CodecSpec:
    """`base` with its indices under bzip2 (flq/codec/lossless.py): the same header and checks;
    the payload is inflated (never past the tensor's count) and checked as the base's."""
    codec = lossless.COMPRESSED_OF[base.codec]

    def decode(enc: EncodedTensor) -> np.ndarray:
        expanded = lossless.expand(enc)
        base.check_payload(expanded)
        return base.decode(expanded)

    def max_bytes(bits: int, count: int, scales: Scales) -> int:
        base.check_scales(codec, base.scale_names, scales)  # the block size sets the radii
        return lossless.max_payload_bytes(codec, bits, count, scales)

    return CodecSpec(
        codec=codec,
        min_bits=base.min_bits,
        max_bits=base.max_bits,
        scale_names=base.scale_names,
        encode=lambda x, o: lossless.compress(base.encode(x, o)),
        decode=decode,
        max_payload_bytes=max_bytes,
        check_payload=lambda enc: base.check_payload(lossless.expand(enc)),
        check_scales=lambda _codec, names, scales: base.check_scales(codec, names, scales),
        decode_checks_payload=True,
    )


_BLOCK_GRID_SPEC = CodecSpec(
    codec=Codec.BLOCK_GRID,
    min_bits=blockgrid.MIN_BITS,
    max_bits=MAX_BITS,
    scale_names=("block",),
    encode=lambda x, o: quantizers.encode_block_grid(x, o.bits, o.block, o.rng),
    decode=lambda enc: blockgrid.decode(enc.data, enc.bits, enc.size, int(enc.scales[0])),
    max_payload_bytes=_block_payload_bytes,
    check_payload=lambda enc: blockgrid.check_payload(
        enc.data, enc.bits, enc.size, int(enc.scales[0])
    ),
    check_scales=_block_scales,
)
_LAQ_GRID_SPEC = CodecSpec(
    codec=Codec.LAQ_GRID,
    min_bits=MIN_BITS,
    max_bits=MAX_BITS,
    scale_names=("R",),
    encode=lambda x, o: quantizers.encode_laq_grid(x, o.bits, o.rng),
    decode=_grid_decode,
    max_payload_bytes=_packed_bytes,
    check_payload=_packed_payload,
)

SPECS: dict[Codec, CodecSpec] = {
    spec.codec: spec
    for spec in (
        _float_spec(Codec.FLOAT32, 32, quantizers.encode_float32),
        _float_spec(Codec.FLOAT16, 16, quantizers.encode_float16),
        CodecSpec(
            codec=Codec.STOCHASTIC,
            min_bits=MIN_BITS,
            max_bits=MAX_BITS,
            scale_names=("s",),
            encode=_encode_stochastic,
            decode=_grid_decode,
            max_payload_bytes=_packed_bytes,
            check_payload=_packed_payload,
        ),
        _LAQ_GRID_SPEC,
        CodecSpec(
            codec=Codec.SIGN,
            min_bits=1,
            max_bits=1,
            scale_names=("s",),
            encode=lambda x, _options: quantizers.encode_sign(x),
            decode=lambda enc: quantizers.sign_values(enc.data, enc.size, enc.scales[0]),
            max_payload_bytes=_packed_bytes,
            check_payload=_packed_payload,
        ),
        _BLOCK_GRID_SPEC,
        # the Rice parameter / the number of gap classes, chosen by the encoder
        _sparse_spec(Codec.SPARSE_TERNARY, 0, sparse.MAX_RICE_BITS, sparse.max_ternary_bytes),
        _sparse_spec(
            Codec.SPARSE_TERNARY_GAPCLASS, 1, gapclass.MAX_CLASSES, sparse.max_gapclass_bytes
        ),
        _compressed_spec(_BLOCK_GRID_SPEC),
        _compressed_spec(_LAQ_GRID_SPEC),
    )
}


def _check_table() -> None:
    """Every Codec has exactly one spec, filed under its own id (checked at import)."""
    missing = set(Codec) - set(SPECS)
    if missing:
        raise ImportError(f"codecs without a spec: {sorted(c.name for c in missing)}")
    for codec, spec in SPECS.items():
        if spec.codec is not codec:
            raise ImportError(f"spec for {codec.name} is filed under {spec.codec.name}")


_check_table()


# ---------------------------------------------------------------- dispatch


def spec_of(codec: object) -> CodecSpec:
    """The spec of `codec`; CodecError listing the valid ids if there is none."""
    try:
        return SPECS[Codec(codec)]  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError):
        valid = ", ".join(f"{c.name}={c.value}" for c in Codec)
        raise CodecError(f"codec: got {codec!r}, expected one of {valid}") from None


def encode(
    codec: Codec,
    x: np.ndarray,
    bits: int,
    rng: np.random.Generator | None = None,
    block: int = 256,
    density: float = 0.01,
) -> EncodedTensor:
    """Encode `x` with `codec` at `bits` bits per value (fixed-width codecs require their width);
    `block` is the block size of BLOCK_GRID, `density` the kept fraction of SPARSE_TERNARY
    (whose Rice parameter the encoder picks: `bits` must be in range and is otherwise unused)."""
    spec = spec_of(codec)
    spec.check_bits(bits)
    return spec.encode(x, EncodeOptions(bits=bits, rng=rng, block=block, density=density))


def decode(enc: EncodedTensor, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The float32 array `enc` stands for, after every check of `validate`."""
    spec = spec_of(enc.codec)
    _check_header(spec, enc, expected_shape)
    if not spec.decode_checks_payload:
        spec.check_payload(enc)
    shape = tuple(int(d) for d in enc.shape)
    return spec.decode(enc).reshape(shape)


def validate(enc: EncodedTensor, expected_shape: tuple[int, ...] | None = None) -> None:
    """Raise CodecError naming the field unless `enc` is a well-formed tensor of its codec."""
    spec = spec_of(enc.codec)
    _check_header(spec, enc, expected_shape)
    spec.check_payload(enc)


def _check_header(
    spec: CodecSpec, enc: EncodedTensor, expected_shape: tuple[int, ...] | None
) -> None:
    shape = _checked_shape(enc.shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise CodecError(f"shape: got {shape}, expected {tuple(expected_shape)}")
    spec.check_bits(enc.bits)
    spec.check_scales(spec.codec, spec.scale_names, enc.scales)


def payload_bytes(codec: Codec, bits: int, count: int, scales: Scales = ()) -> int:
    """The most bytes a payload of `count` values with `codec`, `bits` and `scales` may take
    (exact for fixed-size codecs); CodecError if the fields the size depends on are invalid."""
    spec = spec_of(codec)
    spec.check_bits(bits)
    return spec.max_payload_bytes(bits, count, scales)


def _checked_shape(shape: object) -> tuple[int, ...]:
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if dims is None or not all(quantizers.is_int(d) and d >= 0 for d in dims):
        raise CodecError(f"shape: got {shape!r}, expected a tuple of ints >= 0")
    return tuple(int(d) for d in dims)

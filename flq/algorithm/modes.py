"""Upload modes: what a worker sends, with which codec, and against which reference.

- `fedavg`: the raw update as float32 (32 bits per value); never lazy.
- `laq8`: the raw update, 8-bit unbiased stochastic quantization (optional error feedback).
- `bbit`: the innovation u - Q_hat with `b_up` bits: on the LAQ grid (one radius per tensor, the
  DESIGN formula) or, with `bbit_block` = N > 0, on the block grid (0 on the grid, one radius per
  N values; flq/codec/blockgrid.py); either grid's indices go under bzip2 where that is smaller
  (lossless, flq/codec/lossless.py).
- `bin`: the sign of the innovation, one shared magnitude (1 bit per value).
- `stc`: sparse ternary compression (Sattler et al.): the top `density` fraction of the update
  plus the worker's residual, as +-mu at Golomb-coded positions (flq/algorithm/stc.py). A
  contribution counts only in the round it arrives: no stale reuse.
- `sti`: sparse ternary innovation: the top `density` fraction of the innovation u - Q_hat as
  +-mu, the same code as stc, but an innovation mode: Q_hat carries what was left out, and the
  master reuses every worker's Q_i in rounds it does not upload (FLQ's stale reuse and lazy
  rule on STC's code).

Innovation modes (bbit, bin, sti) quantize against the last acknowledged upload Q_hat, which already
carries the quantization error forward; raw modes (fedavg, laq8, stc) quantize the update itself,
laq8 and stc with the residual of what earlier uploads left out added (error feedback).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeAlias, get_args

import numpy as np

from flq.algorithm.stc import SPARSE_CODECS, allowed_kept, kept_count, sparsify
from flq.codec import (
    Codec,
    EncodedTensor,
    encode_block_grid,
    encode_float32,
    encode_laq_grid,
    encode_sign,
    encode_stochastic,
)
from flq.codec.lossless import COMPRESSED_OF, smaller

Mode: TypeAlias = Literal["fedavg", "laq8", "bbit", "bin", "stc", "sti"]
MODES: tuple[Mode, ...] = get_args(Mode)

_LAQ8_BITS = 8
_CODEC_OF: dict[Mode, Codec] = {
    "fedavg": Codec.FLOAT32,
    "laq8": Codec.STOCHASTIC,
    "bbit": Codec.LAQ_GRID,
    "bin": Codec.SIGN,
    "stc": Codec.SPARSE_TERNARY,
    "sti": Codec.SPARSE_TERNARY,
}


def parse_mode(name: str) -> Mode:
    """The mode called `name`; a typo is an error that lists the valid choices."""
    for mode in MODES:
        if mode == name:
            return mode
    raise ValueError(f"unknown mode {name!r}: expected one of {list(MODES)}")


def is_innovation(mode: Mode) -> bool:
    """True where the worker quantizes u - Q_hat rather than u itself."""
    return mode in ("bbit", "bin", "sti")


def is_sparse(mode: Mode) -> bool:
    """True for the sparse ternary modes (a `density` fraction of values as +-mu)."""
    return mode in ("stc", "sti")


def reuses_stale(mode: Mode) -> bool:
    """True where a worker's last contribution keeps counting in rounds it does not upload."""
    return mode != "stc"


def upload_codec(mode: Mode, bbit_block: int = 0) -> Codec:
    if mode == "bbit" and bbit_block > 0:
        return Codec.BLOCK_GRID
    return _CODEC_OF[mode]


def bits_per_value(mode: Mode, b_up: int) -> int:
    """Payload bits per parameter (headers not included); stc's vary with its positions."""
    return {"fedavg": 32, "laq8": _LAQ8_BITS, "bbit": b_up, "bin": 1, "stc": 0, "sti": 0}[mode]


def encode_upload(
    mode: Mode,
    values: np.ndarray,
    b_up: int,
    rng: np.random.Generator,
    stochastic_rounding: bool = False,
    bbit_block: int = 0,
) -> EncodedTensor:
    """Encode one tensor the way `mode` puts it on the wire."""
    values = np.asarray(values, dtype=np.float32)
    if mode == "fedavg":
        return encode_float32(values)
    if mode == "laq8":
        return encode_stochastic(values, _LAQ8_BITS, rng)
    if mode == "bbit" and bbit_block > 0:
        return encode_block_grid(values, b_up, bbit_block, rng if stochastic_rounding else None)
    if mode == "bbit":
        return encode_laq_grid(values, b_up, rng if stochastic_rounding else None)
    return encode_sign(values)


def quantize_update(
    mode: Mode,
    values: Sequence[np.ndarray],
    b_up: int,
    rng: np.random.Generator,
    stochastic_rounding: bool = False,
    bbit_block: int = 0,
    density: float = 0.01,
    gap_classes: bool = True,
    per_tensor: bool = True,
) -> list[EncodedTensor]:
    """Quantize a whole update, each tensor in its packed form: stc and sti pick their top
    values in each tensor (`per_tensor`) or over all tensors together; the other modes encode
    each tensor on its own. `wire_form` gives what travels."""
    if is_sparse(mode):
        return sparsify(values, density, gap_classes, per_tensor)
    return [encode_upload(mode, v, b_up, rng, stochastic_rounding, bbit_block) for v in values]


def wire_form(encoded: Sequence[EncodedTensor]) -> list[EncodedTensor]:
    """What travels: each grid tensor under bzip2 where that is smaller (lossless). Uploads and
    the master's downlink delta alike; each sender decodes what it keeps from the packed form, so
    it never inflates what it just compressed."""
    return [smaller(e) for e in encoded]


def check_upload(
    mode: Mode,
    b_up: int,
    encoded: Sequence[EncodedTensor],
    shapes: Sequence[tuple[int, ...]],
    bbit_block: int = 0,
    density: float = 1.0,
    gap_classes: bool = True,
    per_tensor: bool = True,
) -> None:
    """Raise ValueError unless `encoded` is what a worker in `mode` sends for these shapes."""
    if len(encoded) != len(shapes):
        raise ValueError(f"upload has {len(encoded)} tensors, the model has {len(shapes)}")
    expected_codec = upload_codec(mode, bbit_block)
    for index, (tensor, shape) in enumerate(zip(encoded, shapes, strict=True)):
        if tensor.codec != expected_codec and not (
            (is_sparse(mode) and gap_classes and tensor.codec in SPARSE_CODECS)
            or tensor.codec == COMPRESSED_OF.get(expected_codec)
        ):
            raise ValueError(
                f"tensor {index}: codec {Codec(tensor.codec).name}, mode {mode} sends "
                f"{expected_codec.name}"
            )
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {index}: shape {tuple(tensor.shape)}, expected {shape}")
        if mode in ("laq8", "bbit") and tensor.bits != bits_per_value(mode, b_up):
            raise ValueError(
                f"tensor {index}: {tensor.bits} bits, mode {mode} sends "
                f"{bits_per_value(mode, b_up)}"
            )
        if expected_codec is Codec.BLOCK_GRID and tensor.scales != (float(bbit_block),):
            raise ValueError(
                f"tensor {index}: block size {tensor.scales}, this run's bbit_block is {bbit_block}"
            )
    if is_sparse(mode):
        allowed = allowed_kept(shapes, density, per_tensor)
        if kept_count(encoded) > allowed:
            raise ValueError(
                f"upload keeps {kept_count(encoded)} values, density {density} allows {allowed}"
            )

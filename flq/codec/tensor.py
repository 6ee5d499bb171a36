"""The encoded tensor as it travels, the codec ids, and what a header costs in bits."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Codec(enum.IntEnum):
    """How a tensor's bytes are encoded; equal to the proto enum flq.v1.Codec."""

    FLOAT32 = 1
    FLOAT16 = 2
    STOCHASTIC = 3
    LAQ_GRID = 4
    SIGN = 5
    BLOCK_GRID = 6
    SPARSE_TERNARY = 7
    SPARSE_TERNARY_GAPCLASS = 8
    BLOCK_GRID_BZ2 = 9
    LAQ_GRID_BZ2 = 10


HEADER_FIXED_BITS = 16  # codec id (8) + bit width (8)


def header_bits(ndim: int, nscales: int) -> int:
    """Bits a tensor header costs: fixed part, 32 per shape dim, 32 per scale."""
    return HEADER_FIXED_BITS + 32 * ndim + 32 * nscales


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded tensor as it travels; `flq.codec.validate` says whether it is well formed."""

    codec: Codec
    shape: tuple[int, ...]
    bits: int  # bits per value in `data` (32 for float32, 16 for float16)
    scales: tuple[float, ...]
    data: bytes

    @property
    def size(self) -> int:
        """Number of values: the product of the shape (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    def cost_bits(self) -> int:
        """Bits this tensor costs on the wire: payload plus header."""
        return 8 * len(self.data) + header_bits(len(self.shape), len(self.scales))

"""Small helpers over models held as lists of float32 arrays (one array per tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Shapes = list[tuple[int, ...]]


def as_float32(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Fresh float32 copies, so later in-place changes by the caller cannot reach our state."""
    return [np.array(a, dtype=np.float32, copy=True) for a in arrays]


def zeros(shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    return [np.zeros(shape, dtype=np.float32) for shape in shapes]


def shapes_of(arrays: Sequence[np.ndarray]) -> Shapes:
    return [tuple(int(d) for d in a.shape) for a in arrays]


def sq_norm(arrays: Sequence[np.ndarray]) -> float:
    """Squared L2 norm over all tensors, accumulated in float64 so large models keep precision."""
    return float(sum(np.vdot(a, a) for a in (np.asarray(x, dtype=np.float64) for x in arrays)))


def check_shapes(
    arrays: Sequence[np.ndarray], expected: Sequence[tuple[int, ...]], what: str
) -> None:
    got = shapes_of(arrays)
    if got != list(expected):
        raise ValueError(f"{what}: tensor shapes {got}, expected {list(expected)}")


def check_finite(arrays: Sequence[np.ndarray], what: str) -> None:
    for index, array in enumerate(arrays):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{what}: tensor {index} holds NaN or infinity")

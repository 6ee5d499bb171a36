"""How the stored contributions become one aggregate: the weighted mean, or a robust rule.

Every rule combines the same set the mean does: each counting worker's stored contribution Q_i
(fresh or stale), with its normalised weight w_i. They work on Q_i — the sum of a worker's
quantized innovations, i.e. its current update estimate — never on the innovations themselves,
and they never change Q_i: the store must stay bit-identical to the worker's reference, so a rule
may discount a contribution in this round's aggregate but not edit it.

- mean: sum_i w_i Q_i. Unbiased; one bad contribution moves it without bound.
- trimmed_mean: per coordinate, drop `trim` of the weight mass from each end, weighted mean of
  the rest (Yin et al., ICML 2018, with weights). Survives a minority of outliers per coordinate.
- median: per coordinate, the weighted median. Survives anything short of half the weight,
  at the price of the most variance on honest, skewed (non-IID) data.
- norm_clipped: scale each Q_i down to at most `clip_factor` x the median norm of all Q_i, then
  the weighted mean. Keeps direction and non-IID signal; bounds what one worker can add, but a
  sign-flipped update within the bound still counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias, get_args

import numpy as np

RuleName: TypeAlias = Literal["mean", "trimmed_mean", "median", "norm_clipped"]
RULES: tuple[RuleName, ...] = get_args(RuleName)
_TIE = 1e-12  # cumulative weights within this of 1/2 count as exactly half
CHUNK = 1 << 16  # coordinates sorted at a time


def parse_rule(name: str) -> RuleName:
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}: expected one of {list(RULES)}")
    return name


def combine(
    rule: RuleName,
    contributions: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    trim: float = 0.1,
    clip_factor: float = 2.0,
) -> list[np.ndarray]:
    """The aggregate of `contributions` (one list of tensors each) under `rule`, as float32.
    `weights` are normalised (sum 1), one per contribution; accumulation is in float64."""
    if not contributions:
        raise ValueError("nothing to combine")
    if len(weights) != len(contributions):
        raise ValueError(f"{len(weights)} weights for {len(contributions)} contributions")
    w = np.asarray(weights, dtype=np.float64)
    if rule == "mean":
        return _per_tensor(contributions, lambda rows: rows.astype(np.float64) @ w)
    if rule == "trimmed_mean":
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        return _per_tensor(contributions, lambda rows: _trimmed_mean(rows, w, trim))
    if rule == "median":
        return _per_tensor(contributions, lambda rows: _weighted_median(rows, w))
    if rule == "norm_clipped":
        if clip_factor <= 0:
            raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
        scales = clip_scales(contributions, clip_factor)
        scaled = w * scales
        return _per_tensor(contributions, lambda rows: rows.astype(np.float64) @ scaled)
    raise ValueError(f"unknown aggregation rule {rule!r}: expected one of {list(RULES)}")


def clip_scales(contributions: Sequence[Sequence[np.ndarray]], clip_factor: float) -> np.ndarray:
    """min(1, clip_factor * median norm / norm_i) per contribution (1 for a zero contribution)."""
    norms = np.array([norm(c) for c in contributions])
    bound = clip_factor * float(np.median(norms))
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > bound, bound / safe, 1.0)


def norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm over all tensors, in float64 (a float32 value of 3e38 squares without overflow)."""
    return float(np.sqrt(sum(float(np.vdot(a, a)) for a in _as64(arrays))))


def _as64(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _per_tensor(
    contributions: Sequence[Sequence[np.ndarray]], reduce: Callable[[np.ndarray], np.ndarray]
) -> list[np.ndarray]:
    """Apply `reduce` to each tensor as rows of coordinates (coordinates x contributors, float32,
    contiguous: sorting each row is then ~10x faster than sorting down columns), CHUNK rows at a
    time so the sort's temporaries stay small for large models; reshaped back, float32."""
    out = []
    for index, first in enumerate(contributions[0]):
        rows = np.stack([np.asarray(c[index], np.float32).reshape(-1) for c in contributions], 1)
        reduced = [np.asarray(reduce(rows[i : i + CHUNK])) for i in range(0, len(rows), CHUNK)]
        combined = np.concatenate(reduced) if reduced else np.zeros(0)
        out.append(combined.reshape(np.shape(first)).astype(np.float32))
    return out


def _sorted_with_mass(rows: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per coordinate (row): values sorted ascending, and the cumulative weight below and up to
    each value (float64, so the comparisons with 1/2 and with the trim are exact enough)."""
    order = np.argsort(rows, axis=1)  # ties: equal values, so their order changes nothing
    values = np.take_along_axis(rows, order, axis=1)
    mass = w[order]
    upper = np.cumsum(mass, axis=1)
    return values, upper - mass, upper


def _trimmed_mean(rows: np.ndarray, w: np.ndarray, trim: float) -> np.ndarray:
    values, lower, upper = _sorted_with_mass(rows, w)
    # The share of each value's weight that lies inside [trim, 1 - trim] of the weight mass.
    kept = np.clip(np.minimum(upper, 1.0 - trim) - np.maximum(lower, trim), 0.0, None)
    result: np.ndarray = np.einsum("ij,ij->i", kept, values) / kept.sum(axis=1)
    return result


def _weighted_median(rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The value where the cumulative weight crosses 1/2; where it lands exactly on 1/2 (an even
    count of equal weights), the mean of the two values either side, as the plain median does."""
    values, _, upper = _sorted_with_mass(rows, w)
    low = np.argmax(upper >= 0.5 - _TIE, axis=1)
    high = np.argmax(upper > 0.5 + _TIE, axis=1)
    index = np.arange(len(values))
    result: np.ndarray = 0.5 * (values[index, low].astype(np.float64) + values[index, high])
    return result

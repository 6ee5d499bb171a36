"""Statistics of each contributor's update, for whoever weighs the round (an LLM advisor, or the
agreement rule below): what a careful person would look at before trusting an update.

Per counting contributor i, with Q_i its stored contribution (its current update estimate) and
A = sum_j s_j Q_j the round's aggregate under reference weights s (sample shares):
- norm: ||Q_i||, and norm_ratio = ||Q_i|| / the median norm of the contributors;
- cosine: cos(Q_i, A), agreement with the round's aggregate (Q_i itself in it);
- cosine_others: cos(Q_i, A_-i), with A_-i the weighted mean of the *other* contributions.
  With few workers a large Q_i pulls A towards itself; A_-i cannot;
- change: ||Q_i - Q_i before its last upload|| / ||Q_i before|| (the store keeps it).

All of it comes from dot products with A, so one pass over the contributions:
A_-i = (A - s_i Q_i) / (1 - s_i), hence Q_i.A_-i and ||A_-i|| follow from Q_i.A, ||Q_i|| and ||A||.

The agreement rule: with c_i = cosine_others_i, m their median and d = 1.4826 x their median
absolute deviation (a robust spread), z_i = (m - c_i) / d. An update within 2 spreads below the
median (z <= 2) keeps its sample weight; from z = 2 to z = 4 its weight falls linearly to 0; an
outlier (z > 2) pointing against the rest (c_i <= 0) gets none. Honest non-IID updates disagree
a little, and all alike; one trained on wrong labels disagrees more than the rest spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flq.algorithm.aggregation import weighted_mean
from flq.algorithm.store import ContributionStore
from flq.algorithm.weighting import normalise

TOLERATED_Z = 2.0  # robust deviations below the median agreement that cost nothing
CUT_Z = 4.0  # ... and from where an update gets no weight
MIN_SPREAD = 0.02  # a floor under the spread: near-identical cosines are not outliers


@dataclass(frozen=True)
class UpdateStats:
    norm: float
    norm_ratio: float  # norm / median norm (1.0 when the median is 0)
    cosine: float  # with the round's aggregate; 0.0 when either is zero
    cosine_others: float  # with the weighted mean of the others; cosine when alone
    change: float | None  # relative move of its last upload; None: unknown


def update_stats(
    store: ContributionStore, reference_weights: Mapping[str, float]
) -> dict[str, UpdateStats]:
    """Statistics of every worker in `reference_weights` that has a stored contribution; the
    aggregate they are compared with uses those weights (normalised)."""
    ids = sorted(w for w in reference_weights if store.contribution(w) is not None)
    if not ids:
        return {}
    shares = normalise({w: float(reference_weights[w]) for w in ids})
    aggregate = [a.astype(np.float64) for a in weighted_mean(store, shares)]
    aggregate_sq = _dot(aggregate, aggregate)
    norms = {w: store.norm(w) for w in ids}
    median = statistics.median(norms.values())
    stats = {}
    for worker_id in ids:
        contribution = store.contribution(worker_id)
        assert contribution is not None
        share, own = shares[worker_id], norms[worker_id]
        with_aggregate = _dot(contribution, aggregate)
        cosine = _cosine(with_aggregate, own, aggregate_sq)
        if share < 1.0:
            # Q_i.(A - s Q_i) and ||A - s Q_i||^2; dividing by (1 - s) changes no cosine.
            dot_rest = with_aggregate - share * own * own
            rest_sq = aggregate_sq - 2 * share * with_aggregate + share * share * own * own
            cosine_others = _cosine(dot_rest, own, max(rest_sq, 0.0))
        else:
            cosine_others = cosine
        stats[worker_id] = UpdateStats(
            norm=own,
            norm_ratio=own / median if median > 0 else 1.0,
            cosine=cosine,
            cosine_others=cosine_others,
            change=store.change(worker_id),
        )
    return stats


def agreement_weights(
    samples: Mapping[str, float], stats: Mapping[str, UpdateStats]
) -> dict[str, float]:
    """Sample weights, down-weighted for updates that agree with the others markedly less than
    the rest do (module docstring). A worker without statistics keeps its sample weight; with a
    median agreement <= 0 (no common direction to agree with) nothing changes."""
    cosines = [s.cosine_others for w, s in stats.items() if w in samples]
    median = statistics.median(cosines) if cosines else 0.0
    spread = 1.4826 * statistics.median(abs(c - median) for c in cosines) if cosines else 0.0
    spread = max(spread, MIN_SPREAD)
    weights = {}
    for worker_id, count in samples.items():
        stat = stats.get(worker_id)
        factor = 1.0
        if stat is not None and median > 0:
            factor = agreement_factor(stat.cosine_others, median, spread)
        weights[worker_id] = float(count) * factor
    return weights


def agreement_factor(cosine: float, median: float, spread: float) -> float:
    """1 within TOLERATED_Z robust deviations below the median agreement, 0 from CUT_Z on (and
    for an outlier pointing against the common direction), linear in between."""
    z = (median - cosine) / spread
    if z <= TOLERATED_Z:
        return 1.0
    if cosine <= 0:
        return 0.0
    return max(0.0, (CUT_Z - z) / (CUT_Z - TOLERATED_Z))


def _dot(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(sum(np.vdot(np.asarray(x, np.float64), y) for x, y in zip(a, b, strict=True)))


def _cosine(dot: float, norm_a: float, norm_b_sq: float) -> float:
    denominator = norm_a * math.sqrt(norm_b_sq)
    if denominator <= 0 or not math.isfinite(denominator):
        return 0.0
    return max(-1.0, min(1.0, dot / denominator))

"""One round's aggregate: the weighted mean of every stored contribution, fresh or stale.

    A = sum_i w_i Q_i      over workers with a counting contribution, sum_i w_i = 1
                           (in stc mode: over this round's uploads only)

or, with `rule` other than "mean", a robust combination of the same Q_i and w_i
(flq/algorithm/robust.py); then, optionally:
- scale_by_selected: A *= sel_ref * fresh / contributors. Stale contributions already moved the
  model in earlier rounds; when most of this round's mean is old information the step shrinks
  in proportion, and a round where everyone uploaded steps by sel_ref.
- clip_global > 0: A *= min(1, clip_global / ||A||), applied last so the bound holds for the
  step the server optimizer actually receives.

The lazy scalar broadcast with the next round is h = ||sum_i w_i Q_i||^2, taken before the two
options above (the optimizer-agnostic form in DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from flq.algorithm._arrays import sq_norm, zeros
from flq.algorithm.robust import RULES, RuleName, combine
from flq.algorithm.store import ContributionStore
from flq.algorithm.weighting import (
    SampleWeighting,
    UniformWeighting,
    Weighting,
    make_weighting,
    normalise,
)

__all__ = [
    "AggregateOptions",
    "AggregateResult",
    "ContributionStore",
    "SampleWeighting",
    "UniformWeighting",
    "Weighting",
    "aggregate",
    "make_weighting",
    "normalise",
    "weighted_mean",
]


@dataclass(frozen=True)
class AggregateOptions:
    clip_global: float = 0.0  # 0: no clipping
    scale_by_selected: bool = False
    sel_ref: float = 1.0
    rule: RuleName = "mean"
    trim: float = 0.1  # trimmed_mean: weight share dropped at each end, per coordinate
    clip_factor: float = 2.0  # norm_clipped: bound = clip_factor x the median contribution norm

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.clip_factor <= 0:
            raise ValueError(f"clip_factor must be > 0, got {self.clip_factor}")
        if self.clip_global < 0:
            raise ValueError(f"clip_global must be >= 0, got {self.clip_global}")
        if self.sel_ref <= 0:
            raise ValueError(f"sel_ref must be > 0, got {self.sel_ref}")


@dataclass(frozen=True)
class AggregateResult:
    delta: list[np.ndarray]  # the step direction handed to the server optimizer
    weights: dict[str, float]  # normalised, one per contributor
    lazy_scalar: float  # h = ||weighted mean||^2, before scaling and clipping
    scale: float  # factor applied to the weighted mean (1.0: none)
    contributors: int
    fresh: int  # contributors that uploaded this round


def weighted_mean(store: ContributionStore, weights: Mapping[str, float]) -> list[np.ndarray]:
    """sum_i w_i Q_i, accumulated in float64 in sorted worker order (deterministic)."""
    totals = [np.zeros(shape, dtype=np.float64) for shape in store.shapes]
    for worker_id in sorted(weights):
        contribution = store.contribution(worker_id)
        if contribution is None:
            raise ValueError(f"worker {worker_id!r} has no stored contribution")
        for total, q in zip(totals, contribution, strict=True):
            total += weights[worker_id] * q
    return [t.astype(np.float32) for t in totals]


def _combine(
    store: ContributionStore, weights: Mapping[str, float], options: AggregateOptions
) -> list[np.ndarray]:
    if options.rule == "mean":
        return weighted_mean(store, weights)
    ids = sorted(weights)
    stored = [store.contribution(w) for w in ids]
    contributions = [c for c in stored if c is not None]
    if len(contributions) != len(ids):
        raise ValueError("every weighted worker needs a stored contribution")
    return combine(
        options.rule,
        contributions,
        [weights[w] for w in ids],
        trim=options.trim,
        clip_factor=options.clip_factor,
    )


def _selected_factor(options: AggregateOptions, fresh: int, contributors: int) -> float:
    if not options.scale_by_selected or contributors == 0:
        return 1.0
    return options.sel_ref * fresh / contributors


def _clip_factor(options: AggregateOptions, norm: float) -> float:
    if options.clip_global <= 0 or norm <= options.clip_global:
        return 1.0
    return options.clip_global / norm


def aggregate(
    store: ContributionStore,
    weighting: Weighting,
    samples: Mapping[str, int],
    fresh: Collection[str],
    options: AggregateOptions = AggregateOptions(),
) -> AggregateResult:
    """The round's aggregate. Pure: the caller records `weights` (store.record_weights)."""
    contributors = store.contributors(fresh)
    if not contributors:
        return AggregateResult(zeros(store.shapes), {}, 0.0, 1.0, 0, 0)
    proposed = weighting.weights(contributors, samples)
    # Only contributors can carry weight: one the rule left out weighs 0, extra names are ignored.
    weights = normalise({w: float(proposed.get(w, 0.0)) for w in contributors})
    mean = _combine(store, weights, options)
    lazy_scalar = sq_norm(mean)
    fresh_count = sum(1 for w in contributors if w in fresh)
    scale = _selected_factor(options, fresh_count, len(contributors))
    scale *= _clip_factor(options, scale * lazy_scalar**0.5)
    delta = mean if scale == 1.0 else [(m * np.float32(scale)).astype(np.float32) for m in mean]
    return AggregateResult(delta, weights, lazy_scalar, scale, len(contributors), fresh_count)

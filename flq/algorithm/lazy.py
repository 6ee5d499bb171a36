"""The lazy upload rule (LAQ, Sun et al. 2019), evaluated on scalars only.

A worker uploads iff its innovation energy beats a threshold built from the recent movement of
the global model and the quantization errors on both sides:

    ||dQ||^2 > thr_scale * [ sum_{d=1..D} (ck/D) * h_{k-d} + 3 (||eps_k||^2 + ||eps_hat||^2) ]

or it is forced: its clock reached C (staleness bound) or the run is still warming up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LazyParams:
    thr_scale: float = 0.0  # 0 switches the rule off: every worker wants to upload
    history: int = 10  # D: how many broadcast scalars h the threshold looks back on
    ck: float = 0.8  # weight of the model-movement term, spread evenly over D rounds
    max_clock: int = 50  # C: rounds without a granted upload before one is forced
    warmup: int = 5  # rounds 0..warmup-1 force every worker to upload

    def __post_init__(self) -> None:
        if self.thr_scale < 0:
            raise ValueError(f"thr_scale must be >= 0, got {self.thr_scale}")
        if self.history < 1:
            raise ValueError(f"history (D) must be >= 1, got {self.history}")
        if self.max_clock < 1:
            raise ValueError(f"max_clock (C) must be >= 1, got {self.max_clock}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class LazyDecision:
    wants_upload: bool
    forced: bool
    threshold: float


def lazy_threshold(
    params: LazyParams, history: Sequence[float], err_sq_new: float, err_sq_ref: float
) -> float:
    """Right-hand side of the rule. `history` holds the last broadcast scalars, newest last;
    rounds not seen yet count as 0, so only the newest D entries are used."""
    recent = list(history)[-params.history :]
    movement = params.ck / params.history * float(sum(recent))
    return params.thr_scale * (movement + 3.0 * (err_sq_new + err_sq_ref))


def is_forced(params: LazyParams, clock: int, round_index: int) -> bool:
    return clock >= params.max_clock or round_index < params.warmup


def decide(
    params: LazyParams,
    energy: float,
    threshold: float,
    clock: int,
    round_index: int,
    lazy_enabled: bool = True,
) -> LazyDecision:
    """Whether to offer an upload. With the rule off (thr_scale 0 or lazy_enabled False) the
    worker always wants to; `forced` still reports the clock/warm-up so selection can put
    starved workers first."""
    forced = is_forced(params, clock, round_index)
    rule_on = lazy_enabled and params.thr_scale > 0
    wants = forced or not rule_on or energy > threshold
    return LazyDecision(wants_upload=wants, forced=forced, threshold=threshold)

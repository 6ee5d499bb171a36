"""Update screening: refuse an upload whose contribution is far larger than everyone else's.

A worker's candidate contribution (its stored Q_i once this upload is applied) is refused when

    ||Q_i|| > factor * median_j ||Q_j||     over every other counting contribution j,

this round's other candidates included (with their new values). The median holds while fewer
than half of the contributions are bad, so a single board sending 3e38s — or an honest one whose
loss exploded — cannot set its own bar. Nothing is screened with fewer than `min_peers` others to
compare against (two boards cannot outvote each other), nor against a median of zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ScreenOptions:
    factor: float = 10.0  # 0: no screening
    min_peers: int = 2

    def __post_init__(self) -> None:
        if self.factor < 0:
            raise ValueError(f"screen factor must be >= 0, got {self.factor}")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be >= 1, got {self.min_peers}")


def screen_norms(
    candidates: Mapping[str, float], peers: Mapping[str, float], options: ScreenOptions
) -> dict[str, str]:
    """The refused candidates and why. `candidates`: this round's candidate norms by worker;
    `peers`: the norms of the other stored contributions that count (a candidate's own stored
    contribution, if listed, is ignored: its new value replaces it)."""
    if options.factor <= 0:
        return {}
    everyone = {**peers, **candidates}
    refused = {}
    for worker, value in candidates.items():
        others = [n for w, n in everyone.items() if w != worker]
        if len(others) < options.min_peers:
            continue
        median = statistics.median(others)
        if median > 0 and value > options.factor * median:
            refused[worker] = (
                f"update norm {value:.3g} > {options.factor:g} x median {median:.3g} "
                f"of {len(others)} others"
            )
    return refused

"""Aggregation weights: a seam (Protocol) with the two built-in rules.

Other rules (an LLM's proposal with a fallback, say) wrap or replace these from outside; the
aggregate only ever sees normalised weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol


class Weighting(Protocol):
    name: str

    def weights(self, worker_ids: Sequence[str], samples: Mapping[str, int]) -> dict[str, float]:
        """Non-negative raw weights for `worker_ids`; `aggregate` normalises them to sum 1."""
        ...


class SampleWeighting:
    """FedAvg: weight by local sample count (workers with 0 or unknown count weigh 0)."""

    name: str = "samples"

    def weights(self, worker_ids: Sequence[str], samples: Mapping[str, int]) -> dict[str, float]:
        return {w: float(samples.get(w, 0)) for w in worker_ids}


class UniformWeighting:
    name: str = "uniform"

    def weights(self, worker_ids: Sequence[str], samples: Mapping[str, int]) -> dict[str, float]:
        return dict.fromkeys(worker_ids, 1.0)


def normalise(raw: Mapping[str, float]) -> dict[str, float]:
    """Weights summing to 1. All-zero weights (no sample counts yet) fall back to uniform rather
    than dividing by zero; negative or non-finite weights are an error."""
    for worker_id, weight in raw.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight for {worker_id!r} must be finite and >= 0, got {weight}")
    total = math.fsum(raw.values())
    if total <= 0:
        return {w: 1.0 / len(raw) for w in raw} if raw else {}
    return {w: weight / total for w, weight in raw.items()}


def make_weighting(name: str) -> Weighting:
    rules: dict[str, Weighting] = {"samples": SampleWeighting(), "uniform": UniformWeighting()}
    if name not in rules:
        raise ValueError(f"unknown weighting {name!r}: expected one of {sorted(rules)}")
    return rules[name]

"""The seam between the round engine and whoever proposes a round's aggregation weights.

After a round's uploads land, the engine hands a `WeightAdvisor` one `ContributorFacts` per worker
whose contribution counts this round — its sample count, freshness, recent losses, location,
stated features and the statistics of its update (flq/algorithm/update_stats.py) — and the
server's `ServerSignals` (rounds done of max, global accuracy and loss), and awaits a
`WeightDecision`; the master's step then aggregates with those weights. `advise_within` bounds the
wait and turns any failure into the advisor's fallback (sample weights).

Advisors: `LlmAdvisor` (flq/master/llm.py) asks a language model; `AgreementAdvisor` here is the
deterministic rule on the same statistics (weighting = "agreement"): what the numbers alone give,
and the yardstick an LLM has to beat.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from flq.algorithm import SampleWeighting, UpdateStats, agreement_weights
from flq.master.registry import WorkerRecord
from flq.master.results import one_line
from flq.master.state import WeightDecision
from flq.types import Location

log = structlog.get_logger("flq.master.advice")
ADVICE_GRACE_S = 1.0  # beyond the advisor's own timeout, which bounds its call to the model
HISTORY = 10  # evaluations and round losses the server remembers for its signals


@dataclass(frozen=True)
class ContributorFacts:
    """One worker whose contribution counts in this round's aggregate."""

    worker_id: str
    num_samples: int
    fresh: bool  # uploaded this round
    staleness: int | None  # rounds since its last upload; None: unknown (e.g. after a restart)
    uplink_bits: int
    recent_losses: tuple[float, ...] = ()
    location: Location = field(default_factory=Location)
    features: Mapping[str, float] = field(default_factory=dict)
    update: UpdateStats | None = None  # None: no statistics (no stored contribution)


@dataclass(frozen=True)
class Evaluated:
    round: int
    accuracy: float
    loss: float


@dataclass(frozen=True)
class ServerSignals:
    """What the server knows about the run as a whole when it asks."""

    round: int
    max_rounds: int
    evaluations: tuple[Evaluated, ...] = ()  # the global model on the test split, oldest first
    train_losses: tuple[float, ...] = ()  # the rounds' sample-weighted offered losses


class RunProgress:
    """The recent history the server signals come from: the bookkeeper adds each evaluation,
    the engine each round's training loss."""

    def __init__(self, max_rounds: int) -> None:
        self.max_rounds = max_rounds
        self._evaluations: deque[Evaluated] = deque(maxlen=HISTORY)
        self._train_losses: deque[float] = deque(maxlen=HISTORY)

    def evaluated(self, round_id: int, accuracy: float, loss: float) -> None:
        if math.isfinite(accuracy) and math.isfinite(loss):
            self._evaluations.append(Evaluated(round_id, accuracy, loss))

    def trained(self, train_loss: float) -> None:
        if math.isfinite(train_loss):
            self._train_losses.append(train_loss)

    def signals(self, round_id: int) -> ServerSignals:
        return ServerSignals(
            round_id, self.max_rounds, tuple(self._evaluations), tuple(self._train_losses)
        )


def facts_for(
    worker_id: str,
    record: WorkerRecord | None,
    round_id: int,
    fresh: bool,
    update: UpdateStats | None = None,
) -> ContributorFacts:
    """What the registry knows about a contributor (a contributor it has no record of — after a
    master restart, before the worker reconnects — is described by its id and update alone)."""
    if record is None:
        return ContributorFacts(worker_id, 0, fresh, None, 0, update=update)
    last = record.last_upload_round
    return ContributorFacts(
        worker_id=worker_id,
        num_samples=record.num_samples,
        fresh=fresh,
        staleness=round_id - last if last >= 0 else None,
        uplink_bits=record.uplink_bits,
        recent_losses=tuple(x for x in record.recent_losses if math.isfinite(x)),
        location=record.location,
        features=dict(record.features),
        update=update,
    )


def loss_trend(losses: Sequence[float]) -> dict[str, Any]:
    """Least-squares slope of the losses per step, and a word for it (1 % of the mean loss per
    step separates "falling"/"rising" from "flat")."""
    if len(losses) < 2:
        return {"slope": None, "direction": "unknown"}
    n = len(losses)
    mean_x, mean_y = (n - 1) / 2, math.fsum(losses) / n
    slope = math.fsum((i - mean_x) * (y - mean_y) for i, y in enumerate(losses)) / math.fsum(
        (i - mean_x) ** 2 for i in range(n)
    )
    flat = 0.01 * abs(mean_y)
    direction = "falling" if slope < -flat else "rising" if slope > flat else "flat"
    return {"slope": rounded(slope), "direction": direction}


def rounded(value: float) -> float | None:
    """A number for a prompt: 5 decimals, None for NaN and infinities (JSON has neither)."""
    return round(float(value), 5) if math.isfinite(value) else None


# ---------------------------------------------------------------- the seam


class WeightAdvisor(Protocol):
    """Proposes a round's aggregation weights; the engine awaits it for at most `timeout_s`."""

    timeout_s: float

    async def advise(
        self, round_id: int, contributors: Sequence[ContributorFacts], server: ServerSignals
    ) -> WeightDecision: ...

    def fallback(
        self, contributors: Sequence[ContributorFacts], reason: str, detail: str = ""
    ) -> WeightDecision: ...


async def advise_within(
    advisor: WeightAdvisor,
    round_id: int,
    contributors: Sequence[ContributorFacts],
    server: ServerSignals,
) -> WeightDecision:
    """The advisor's weights, waited on for at most its timeout (plus a grace the advisor itself
    never needs); an overrun or any error is the advisor's fallback, so advice costs a round
    nothing but its own answer."""
    try:
        return await asyncio.wait_for(
            advisor.advise(round_id, contributors, server), advisor.timeout_s + ADVICE_GRACE_S
        )
    except asyncio.TimeoutError:
        return advisor.fallback(contributors, "timeout", "the advisor overran its timeout")
    except Exception as error:  # an advisor's bug must cost one round's advice, not the round
        log.exception("weight advisor failed", error=type(error).__name__)
        return advisor.fallback(contributors, "error", f"{type(error).__name__}: {error}")


def sample_weights(contributors: Sequence[ContributorFacts]) -> dict[str, float]:
    ids = [c.worker_id for c in contributors]
    return SampleWeighting().weights(ids, {c.worker_id: c.num_samples for c in contributors})


class AgreementAdvisor:
    """The deterministic rule on the advisor's statistics (weighting = "agreement"): sample
    weights, down-weighted where an update agrees less with the others than the median does
    (flq.algorithm.update_stats.agreement_weights). No network, no cache, no confidence."""

    name = "agreement"
    timeout_s = 5.0  # arithmetic on a few numbers per worker; the bound is never near

    async def advise(
        self, round_id: int, contributors: Sequence[ContributorFacts], server: ServerSignals
    ) -> WeightDecision:
        samples = {c.worker_id: float(c.num_samples) for c in contributors}
        stats = {c.worker_id: c.update for c in contributors if c.update is not None}
        weights = agreement_weights(samples, stats)
        cut = sorted(w for w in weights if weights[w] < samples[w])
        detail = (
            "down-weighted for disagreeing with the others: "
            + ", ".join(f"{w} x{weights[w] / samples[w]:.2f}" for w in cut if samples[w] > 0)
            if cut
            else "every update agrees with the others"
        )
        return WeightDecision(weights, "agreement", math.nan, one_line(detail))

    def fallback(
        self, contributors: Sequence[ContributorFacts], reason: str, detail: str = ""
    ) -> WeightDecision:
        return WeightDecision(
            sample_weights(contributors), f"fallback:{reason}", math.nan, one_line(detail)
        )

"""Which offered uploads the master grants this round.

Order of business:
1. Offers that do not want to upload are denied as "lazy" (forced offers always want).
2. Forced offers go first, best energy per bit first. They are still held to the budget and to
   `sel_clients`: one that does not fit is denied ("budget" / "top-k") and the next is tried.
3. The rest, by the first limit that is set:
   - sel_clients > 0: the top K by energy (K counts forced grants too), skipping any that would
     break a budget that is also set;
   - up_budget_bits > 0: greedy knapsack by energy per bit under the remaining budget, with the
     best-single-item guard (greedy alone can be arbitrarily bad: one big valuable item loses to
     a cheap trickle), keeping whichever set carries more energy;
   - neither: everyone who wants.
Ties always break by worker id, so the result is deterministic.

"Energy" above is an offer's value: its innovation energy ||dQ||^2 times weight^2, where weight is
the worker's share of the aggregate (1 unless the caller says otherwise). With sample shares as
weights the value is the squared error a stale contribution leaves in the weighted aggregate, so
a large worker's change outranks a tiny worker's change of the same size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

LAZY = "lazy"
BUDGET = "budget"
TOP_K = "top-k"


@dataclass(frozen=True)
class Offer:
    worker_id: str
    wants_upload: bool
    cost_bits: int
    energy: float
    forced: bool = False
    weight: float = 1.0  # the worker's share of the aggregate; the offer's value is energy * w^2

    @property
    def value(self) -> float:
        return self.energy * self.weight * self.weight


@dataclass(frozen=True)
class Selection:
    granted: list[str]  # in the order they were chosen
    denied: dict[str, str]  # worker id -> "lazy" | "budget" | "top-k"
    granted_bits: int = 0
    granted_energy: float = 0.0


@dataclass
class _Plan:
    """Selection under construction: the budget and slots left, and what was decided."""

    budget_left: float  # inf when there is no budget
    slots_left: float  # inf when there is no top-K
    granted: list[Offer] = field(default_factory=list)
    denied: dict[str, str] = field(default_factory=dict)

    def fits(self, offer: Offer) -> bool:
        return offer.cost_bits <= self.budget_left

    def grant(self, offer: Offer) -> None:
        self.granted.append(offer)
        self.budget_left -= offer.cost_bits
        self.slots_left -= 1

    def try_grant(self, offer: Offer) -> None:
        if self.slots_left < 1:
            self.denied[offer.worker_id] = TOP_K
        elif not self.fits(offer):
            self.denied[offer.worker_id] = BUDGET
        else:
            self.grant(offer)


def _per_bit(offer: Offer) -> float:
    return offer.value / offer.cost_bits if offer.cost_bits > 0 else float("inf")


def _by_per_bit(offers: Sequence[Offer]) -> list[Offer]:
    return sorted(offers, key=lambda o: (-_per_bit(o), o.worker_id))


def _by_value(offers: Sequence[Offer]) -> list[Offer]:
    return sorted(offers, key=lambda o: (-o.value, o.worker_id))


def _knapsack(offers: Sequence[Offer], budget: float) -> list[Offer]:
    """Greedy by energy per bit, guarded by the best single item that fits alone."""
    chosen: list[Offer] = []
    left = budget
    for offer in _by_per_bit(offers):
        if offer.cost_bits <= left:
            chosen.append(offer)
            left -= offer.cost_bits
    fitting = [o for o in offers if o.cost_bits <= budget]
    if fitting:
        best_single = _by_value(fitting)[0]
        if best_single.value > sum(o.value for o in chosen):
            return [best_single]
    return chosen


def _check_offers(offers: Sequence[Offer]) -> None:
    seen: set[str] = set()
    for offer in offers:
        if offer.worker_id in seen:
            raise ValueError(f"two offers from worker {offer.worker_id!r}")
        seen.add(offer.worker_id)
        if offer.cost_bits < 0 or not offer.energy >= 0:
            raise ValueError(f"offer from {offer.worker_id!r}: cost and energy must be >= 0")
        if not 0 <= offer.weight < float("inf"):
            raise ValueError(f"offer from {offer.worker_id!r}: weight must be finite and >= 0")


def select_uploads(
    offers: Sequence[Offer], sel_clients: int = 0, up_budget_bits: float = 0.0
) -> Selection:
    _check_offers(offers)
    inf = float("inf")
    plan = _Plan(
        budget_left=up_budget_bits if up_budget_bits > 0 else inf,
        slots_left=sel_clients if sel_clients > 0 else inf,
    )
    for offer in offers:
        if not (offer.wants_upload or offer.forced):
            plan.denied[offer.worker_id] = LAZY
    for offer in _by_per_bit([o for o in offers if o.forced]):
        plan.try_grant(offer)
    optional = [o for o in offers if o.wants_upload and not o.forced]
    if sel_clients > 0:
        for offer in _by_value(optional):
            plan.try_grant(offer)
    elif up_budget_bits > 0:
        chosen = _knapsack(optional, plan.budget_left)
        for offer in chosen:
            plan.grant(offer)
        chosen_ids = {o.worker_id for o in chosen}
        plan.denied.update({o.worker_id: BUDGET for o in optional if o.worker_id not in chosen_ids})
    else:
        for offer in sorted(optional, key=lambda o: o.worker_id):
            plan.grant(offer)
    return Selection(
        granted=[o.worker_id for o in plan.granted],
        denied=plan.denied,
        granted_bits=sum(o.cost_bits for o in plan.granted),
        granted_energy=sum(o.energy for o in plan.granted),
    )

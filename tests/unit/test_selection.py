"""Master-side selection: budget, forced first, top-K, knapsack guard, determinism."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flq.algorithm import Offer, select_uploads


def _offer(
    worker: str, cost: int, energy: float, *, wants: bool = True, forced: bool = False
) -> Offer:
    return Offer(worker_id=worker, wants_upload=wants, cost_bits=cost, energy=energy, forced=forced)


def test_lazy_offers_are_denied_as_lazy() -> None:
    offers = [_offer("a", 10, 1.0), _offer("b", 10, 5.0, wants=False)]
    selection = select_uploads(offers)
    assert selection.granted == ["a"]
    assert selection.denied == {"b": "lazy"}


def test_both_limits_zero_grants_everyone_who_wants() -> None:
    offers = [_offer("c", 10, 1.0), _offer("a", 500, 0.0), _offer("b", 1, 2.0, wants=False)]
    selection = select_uploads(offers, sel_clients=0, up_budget_bits=0)
    assert sorted(selection.granted) == ["a", "c"]
    assert selection.denied == {"b": "lazy"}
    assert selection.granted_bits == 510


def test_forced_go_first_even_with_low_energy() -> None:
    offers = [_offer("rich", 60, 100.0), _offer("starved", 50, 0.1, wants=False, forced=True)]
    selection = select_uploads(offers, up_budget_bits=100)
    assert selection.granted == ["starved"]
    assert selection.denied == {"rich": "budget"}


def test_forced_over_budget_are_taken_by_energy_per_bit() -> None:
    offers = [
        _offer("f1", 60, 6.0, forced=True),  # 0.1 per bit
        _offer("f2", 50, 10.0, forced=True),  # 0.2 per bit
        _offer("f3", 40, 2.0, forced=True),  # 0.05 per bit
        _offer("x", 1, 50.0),
    ]
    selection = select_uploads(offers, up_budget_bits=100)
    # f2 (50) then f1 does not fit (110), f3 does (90), x does (91).
    assert selection.granted == ["f2", "f3", "x"]
    assert selection.denied == {"f1": "budget"}
    assert selection.granted_bits == 91


def test_top_k_by_energy_counts_forced() -> None:
    offers = [
        _offer("a", 10, 1.0),
        _offer("b", 10, 9.0),
        _offer("c", 10, 5.0),
        _offer("d", 10, 0.5, forced=True),
        _offer("e", 10, 7.0, wants=False),
    ]
    selection = select_uploads(offers, sel_clients=3)
    assert selection.granted == ["d", "b", "c"]
    assert selection.denied == {"a": "top-k", "e": "lazy"}


def test_top_k_respects_a_budget_that_is_also_set() -> None:
    offers = [_offer("a", 80, 9.0), _offer("b", 30, 5.0), _offer("c", 30, 4.0)]
    selection = select_uploads(offers, sel_clients=2, up_budget_bits=100)
    assert selection.granted == ["a"]
    assert selection.denied == {"b": "budget", "c": "budget"}


def test_knapsack_greedy_by_energy_per_bit() -> None:
    offers = [_offer("a", 40, 8.0), _offer("b", 40, 4.0), _offer("c", 40, 6.0)]
    selection = select_uploads(offers, up_budget_bits=100)
    assert selection.granted == ["a", "c"]
    assert selection.denied == {"b": "budget"}


def test_best_single_item_guard() -> None:
    # Greedy takes the cheap dense item first and then nothing else fits; the big item alone
    # carries far more energy.
    offers = [_offer("cheap", 2, 4.0), _offer("big", 100, 150.0)]
    selection = select_uploads(offers, up_budget_bits=100)
    assert selection.granted == ["big"]
    assert selection.denied == {"cheap": "budget"}


def test_guard_uses_the_budget_left_after_forced() -> None:
    offers = [_offer("f", 50, 0.0, forced=True), _offer("cheap", 2, 4.0), _offer("big", 60, 150.0)]
    selection = select_uploads(offers, up_budget_bits=100)
    assert selection.granted == ["f", "cheap"]
    assert selection.denied == {"big": "budget"}


def test_ties_break_by_worker_id() -> None:
    offers = [_offer(w, 10, 1.0) for w in ("d", "b", "c", "a")]
    assert select_uploads(offers, sel_clients=2).granted == ["a", "b"]
    assert select_uploads(offers, up_budget_bits=25).granted == ["a", "b"]
    assert select_uploads(list(reversed(offers)), up_budget_bits=25).granted == ["a", "b"]


def test_duplicate_or_invalid_offers_are_rejected() -> None:
    with pytest.raises(ValueError, match="two offers"):
        select_uploads([_offer("a", 1, 1.0), _offer("a", 2, 1.0)])
    with pytest.raises(ValueError):
        select_uploads([_offer("a", 1, float("nan"))])
    with pytest.raises(ValueError, match="weight must be finite"):
        select_uploads([Offer("a", True, 1, 1.0, weight=float("inf"))])


def test_weights_rank_by_the_error_a_stale_contribution_leaves() -> None:
    # value = energy * weight^2: a heavy worker's change outranks a light one's larger change
    heavy = Offer("heavy", True, cost_bits=10, energy=1.0, weight=0.6)
    light = Offer("light", True, cost_bits=10, energy=4.0, weight=0.1)
    assert select_uploads([heavy, light], sel_clients=1).granted == ["heavy"]
    assert select_uploads([heavy, light], up_budget_bits=10).granted == ["heavy"]
    unweighted = [Offer("heavy", True, 10, 1.0), Offer("light", True, 10, 4.0)]
    assert select_uploads(unweighted, sel_clients=1).granted == ["light"]
    assert heavy.value == pytest.approx(0.36) and light.value == pytest.approx(0.04)


_offers = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=1000),
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
        st.booleans(),
        st.booleans(),
    ),
    max_size=12,
).map(
    lambda rows: [
        _offer(f"w{i:02d}", cost, energy, wants=wants, forced=forced)
        for i, (cost, energy, wants, forced) in enumerate(rows)
    ]
)


@settings(max_examples=200, deadline=None)
@given(offers=_offers, budget=st.integers(min_value=1, max_value=3000), k=st.integers(0, 5))
def test_budget_is_respected_and_every_offer_is_answered(
    offers: list[Offer], budget: int, k: int
) -> None:
    selection = select_uploads(offers, sel_clients=k, up_budget_bits=budget)
    costs = {o.worker_id: o.cost_bits for o in offers}
    assert sum(costs[w] for w in selection.granted) == selection.granted_bits <= budget
    assert set(selection.granted).isdisjoint(selection.denied)
    assert set(selection.granted) | set(selection.denied) == set(costs)
    if k:
        assert len(selection.granted) <= k
    for offer in offers:
        if not (offer.wants_upload or offer.forced):
            assert selection.denied[offer.worker_id] == "lazy"
    assert select_uploads(list(reversed(offers)), k, budget) == selection


@settings(max_examples=200, deadline=None)
@given(offers=_offers, budget=st.integers(min_value=1, max_value=3000))
def test_knapsack_beats_every_single_item_that_fits(offers: list[Offer], budget: int) -> None:
    optional = [o for o in offers if o.wants_upload and not o.forced]
    selection = select_uploads(optional, up_budget_bits=budget)
    for offer in optional:
        if offer.cost_bits <= budget:
            assert selection.granted_energy >= offer.energy

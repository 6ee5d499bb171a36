"""Robust aggregation rules, update screening, the stale-reuse bound and the finite-step check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flq.algorithm import (
    AggregateOptions,
    ContributionStore,
    ScreenOptions,
    UniformWeighting,
    aggregate,
    combine,
    make_server_optimizer,
    screen_norms,
)
from flq.codec import encode_float32, encode_sign
from flq.master.state import NON_FINITE_STEP, AlgorithmSettings, MasterState

SHAPES = [(3, 4), (5,)]


def _model(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def _encoded(values: list[np.ndarray]) -> list[object]:
    return [encode_float32(v) for v in values]


def _random(rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    return [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(n)]


# ---------------------------------------------------------------- rules


def test_mean_rule_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    contributions = _random(rng, 4)
    weights = [0.1, 0.2, 0.3, 0.4]
    got = combine("mean", contributions, weights)
    for index, tensor in enumerate(got):
        pairs = zip(weights, contributions, strict=True)
        want = sum(w * c[index].astype(np.float64) for w, c in pairs)
        np.testing.assert_allclose(tensor, want, rtol=1e-6)


def test_median_and_trimmed_mean_match_scipy_with_equal_weights() -> None:
    rng = np.random.default_rng(1)
    for n in (5, 6):  # odd and even counts: the even median averages the middle two
        contributions = _random(rng, n)
        weights = [1.0 / n] * n
        median = combine("median", contributions, weights)
        # one value off each end: scipy trims whole values, we trim weight mass
        trimmed = combine("trimmed_mean", contributions, weights, trim=1.0 / n)
        for index in range(len(SHAPES)):
            stack = np.stack([c[index] for c in contributions]).astype(np.float64)
            np.testing.assert_allclose(median[index], np.median(stack, axis=0), rtol=1e-6)
            want = stats.trim_mean(stack, 1.0 / n, axis=0)
            np.testing.assert_allclose(trimmed[index], want, rtol=1e-5, atol=1e-7)


def test_weighted_median_follows_the_weight_not_the_count() -> None:
    values = [[np.array([v], np.float32)] for v in (1.0, 2.0, 10.0)]
    assert combine("median", values, [0.2, 0.2, 0.6])[0][0] == pytest.approx(10.0)
    assert combine("median", values, [0.6, 0.2, 0.2])[0][0] == pytest.approx(1.0)
    # the cumulative weight lands on 1/2 exactly at 2: any value in [2, 10] is a median
    assert combine("median", values, [0.25, 0.25, 0.5])[0][0] == pytest.approx(6.0)


def test_weighted_trimmed_mean_drops_weight_mass_at_each_end() -> None:
    values = [[np.array([v], np.float32)] for v in (0.0, 1.0, 2.0, 100.0)]
    # trim 0.25 of the mass at each end: the 0 and the 100 go, the mean of 1 and 2 stays
    got = combine("trimmed_mean", values, [0.25, 0.25, 0.25, 0.25], trim=0.25)
    assert got[0][0] == pytest.approx(1.5)
    # the 100 holds 0.4 of the weight: 0.15 of it survives the 0.25 trim
    got = combine("trimmed_mean", values, [0.2, 0.2, 0.2, 0.4], trim=0.25)
    want = (0.15 * 1.0 + 0.2 * 2.0 + 0.15 * 100.0) / 0.5
    assert got[0][0] == pytest.approx(want)


def test_norm_clipped_scales_only_the_outlier() -> None:
    small = [_model(1.0), _model(-1.0), _model(2.0)]
    huge = _model(1000.0)
    got = combine("norm_clipped", [*small, huge], [0.25] * 4, clip_factor=2.0)
    # median norm = 1.5 x |model|; the outlier is cut to 2 x that = 3.0 per value
    np.testing.assert_allclose(got[0], (1.0 - 1.0 + 2.0 + 3.0) / 4, rtol=1e-6)


@pytest.mark.parametrize("attack", [lambda g: -20 * g, lambda g: 100 * g])
def test_robust_rules_bound_one_attacker_the_mean_does_not(attack: object) -> None:
    rng = np.random.default_rng(3)
    honest_mean = _model(1.0)
    honest = [
        [m + 0.1 * rng.normal(size=m.shape).astype(np.float32) for m in honest_mean]
        for _ in range(9)
    ]
    bad = [attack(m) for m in honest_mean]  # type: ignore[operator]
    weights = [0.1] * 10
    errors = {}
    for rule in ("mean", "trimmed_mean", "median", "norm_clipped"):
        got = combine(rule, [*honest, bad], weights)  # type: ignore[arg-type]
        pairs = zip(got, honest_mean, strict=True)
        errors[rule] = max(float(np.abs(g - h).max()) for g, h in pairs)
    assert errors["mean"] > 2.0  # 0.9 x 1 + 0.1 x (-20) is -1.1
    assert errors["median"] < 0.3 and errors["trimmed_mean"] < 0.3
    assert errors["norm_clipped"] < errors["mean"] / 3


def test_aggregate_uses_the_configured_rule_on_stale_and_fresh_alike() -> None:
    store = ContributionStore(SHAPES, "fedavg")
    for worker, value in (("a", 1.0), ("b", 2.0), ("c", 1000.0)):
        store.apply_upload(worker, _encoded(_model(value)))
    options = AggregateOptions(rule="median")
    result = aggregate(store, UniformWeighting(), {}, fresh={"c"}, options=options)
    np.testing.assert_allclose(result.delta[0], 2.0)
    assert result.lazy_scalar == pytest.approx(4.0 * 17)  # h is the robust aggregate's
    with pytest.raises(ValueError, match="rule must be one of"):
        AggregateOptions(rule="krum")  # type: ignore[arg-type]


# ---------------------------------------------------------------- screening


def test_screen_refuses_far_above_the_median_of_the_others() -> None:
    options = ScreenOptions(factor=10.0)
    refused = screen_norms({"bad": 1e39, "ok": 1.2}, {"a": 1.0, "b": 0.9}, options)
    assert list(refused) == ["bad"] and "x median" in refused["bad"]
    # two others only (min_peers 2) still screen; one other does not
    assert screen_norms({"bad": 1e3}, {"a": 1.0, "b": 1.0}, options)
    assert screen_norms({"bad": 1e3}, {"a": 1.0}, options) == {}
    assert screen_norms({"bad": 1e3}, {"a": 1.0, "b": 1.0}, ScreenOptions(factor=0)) == {}
    # a candidate's own stale contribution is no peer of its new one
    assert screen_norms({"a": 1e3}, {"a": 1e3, "b": 1.0, "c": 1.0}, options)


def test_store_refuses_huge_finite_upload_and_resets_its_worker() -> None:
    """3e38 is finite, so the NaN check lets it through; the screen must not."""
    store = ContributionStore(SHAPES, "fedavg")
    for worker in ("a", "b", "c"):
        store.apply_upload(worker, _encoded(_model(1.0)))
    refused = store.apply_uploads(
        {"a": _encoded(_model(1.1)), "bad": _encoded(_model(3e38))}, ScreenOptions()
    )
    assert list(refused) == ["bad"]
    assert store.contribution("bad") is None and store.version("bad") == 0
    assert store.version("a") == 2 and store.contributors() == ["a", "b", "c"]


def test_innovation_that_overflows_the_contribution_is_refused() -> None:
    store = ContributionStore(SHAPES, "bin")
    big = [np.full(s, 3e38, np.float32) for s in SHAPES]
    store.apply_upload("w", [encode_sign(v) for v in big])
    refused = store.apply_uploads({"w": [encode_sign(v) for v in big]}, ScreenOptions())
    assert "NaN or infinity" in refused["w"]
    assert store.contribution("w") is None


# ---------------------------------------------------------------- stale bound


def test_absent_worker_stops_counting_after_max_absent_and_returns() -> None:
    store = ContributionStore(SHAPES, "fedavg", max_absent=2)
    for worker in ("here", "gone"):
        store.apply_upload(worker, _encoded(_model(1.0)))
    assert store.note_round({"here", "gone"}) == []
    assert store.note_round({"here"}) == []
    assert store.note_round({"here"}) == []
    assert store.contributors() == ["gone", "here"]  # two rounds gone: still counts
    assert store.note_round({"here"}) == ["gone"]
    assert store.contributors() == ["here"]
    assert store.version("gone") == 1  # kept, so a return needs no reset
    store.note_round({"here", "gone"})
    assert store.contributors() == ["gone", "here"]
    state = store.state()
    restored = ContributionStore(SHAPES, "fedavg", max_absent=2)
    restored.load_state(state)
    assert restored.absent("gone") == 0 and restored.norm("here") > 0


# ---------------------------------------------------------------- finite step


def test_propose_changes_nothing_until_commit() -> None:
    opt = make_server_optimizer("adam", lr=0.1)
    proposal = opt.propose(_model(0.0), _model(1.0))
    assert opt.state()["t"] == 0 and opt.state()["m"] == []
    opt.commit(proposal)
    assert opt.state()["t"] == 1
    assert not opt.propose(_model(0.0), _model(3e38)).finite()  # g^2 overflows v


@pytest.mark.parametrize("optimizer", ["avg", "adam"])
def test_step_that_would_not_be_finite_drops_the_culprit(optimizer: str) -> None:
    """Before: avg added 3e38 to weights near 3e38 (inf); adam squared it into v (inf, NaN)."""
    settings = AlgorithmSettings(mode="fedavg", server_optimizer=optimizer, server_lr=0.01)
    state = MasterState(_model(3e38 if optimizer == "avg" else 0.5), settings)
    state.store.apply_upload("honest", _encoded(_model(-0.5)))
    state.store.apply_upload("huge", _encoded(_model(3.4e38)))  # below any screen: one peer
    result = state.step({"honest": 1, "huge": 1}, fresh={"honest", "huge"})
    assert result.refused == {"huge": NON_FINITE_STEP}
    assert state.store.contribution("huge") is None and state.store.version("huge") == 0
    assert all(np.all(np.isfinite(w)) for w in state.weights)
    assert result.weights == {"honest": 1.0}
    assert all(np.all(np.isfinite(a)) for a in state.optimizer.state().get("v", []))


def test_checkpoint_with_a_non_finite_model_is_refused() -> None:
    state = MasterState(_model(0.0), AlgorithmSettings(mode="fedavg"))
    saved = state.snapshot()
    saved["weights"] = _model(np.inf)
    with pytest.raises(ValueError, match="NaN or infinity"):
        MasterState(_model(0.0), AlgorithmSettings(mode="fedavg")).restore(saved)

"""The lazy rule against thresholds computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from flq.algorithm import LazyParams, UploadReference, UploadSettings, decide, lazy_threshold


def test_threshold_matches_hand_computation_with_missing_history() -> None:
    params = LazyParams(thr_scale=2.0, history=4, ck=0.8)
    # Three of four scalars seen: the missing one counts as 0.
    # 2 * (0.8/4 * (1 + 2 + 3) + 3 * (0.5 + 0.25)) = 2 * (1.2 + 2.25) = 6.9
    assert lazy_threshold(params, [1.0, 2.0, 3.0], 0.5, 0.25) == pytest.approx(6.9)


def test_threshold_uses_only_the_newest_d_scalars() -> None:
    params = LazyParams(thr_scale=1.0, history=2, ck=1.0)
    # Only 3 and 5 count: 1/2 * 8 = 4; no error terms.
    assert lazy_threshold(params, [100.0, 3.0, 5.0], 0.0, 0.0) == pytest.approx(4.0)


def test_zero_thr_scale_gives_zero_threshold() -> None:
    assert lazy_threshold(LazyParams(thr_scale=0.0), [9.0], 9.0, 9.0) == 0.0


@pytest.mark.parametrize(
    ("energy", "wants"),
    [(6.91, True), (6.9, False), (1.0, False)],
)
def test_upload_iff_energy_strictly_beats_threshold(energy: float, wants: bool) -> None:
    params = LazyParams(thr_scale=2.0, history=4, ck=0.8, max_clock=50, warmup=0)
    decision = decide(params, energy, 6.9, clock=0, round_index=10)
    assert decision.wants_upload is wants
    assert decision.forced is False


def test_clock_at_c_forces_an_upload() -> None:
    params = LazyParams(thr_scale=1.0, max_clock=3, warmup=0)
    assert not decide(params, 0.0, 1.0, clock=2, round_index=10).wants_upload
    forced = decide(params, 0.0, 1.0, clock=3, round_index=10)
    assert forced.wants_upload and forced.forced


def test_warmup_forces_an_upload() -> None:
    params = LazyParams(thr_scale=1.0, max_clock=50, warmup=2)
    assert decide(params, 0.0, 1.0, clock=0, round_index=1).forced
    assert not decide(params, 0.0, 1.0, clock=0, round_index=2).wants_upload


def test_rule_off_always_wants() -> None:
    off = LazyParams(thr_scale=0.0, warmup=0)
    assert decide(off, 0.0, 0.0, clock=0, round_index=5).wants_upload
    on = LazyParams(thr_scale=1.0, warmup=0)
    assert decide(on, 0.0, 1.0, clock=0, round_index=5, lazy_enabled=False).wants_upload


@pytest.mark.parametrize(
    "kwargs", [{"thr_scale": -1.0}, {"history": 0}, {"max_clock": 0}, {"warmup": -1}]
)
def test_invalid_params_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LazyParams(**kwargs)  # type: ignore[arg-type]


def test_reference_threshold_uses_observed_scalars_and_both_errors() -> None:
    params = LazyParams(thr_scale=0.5, history=3, ck=0.9, max_clock=50, warmup=0)
    reference = UploadReference([(5,)], UploadSettings(mode="bbit", b_up=2, lazy=params))
    rng = np.random.default_rng(0)
    first = reference.prepare([rng.normal(size=5).astype(np.float32)], 0, rng)
    reference.commit(first)
    for h in (0.4, 0.2):
        reference.observe_scalar(h)
    update = [rng.normal(size=5).astype(np.float32)]
    prepared = reference.prepare(update, 1, rng)
    expected = 0.5 * (0.9 / 3 * (0.4 + 0.2) + 3 * (prepared.err_sq + first.err_sq))
    assert prepared.threshold == pytest.approx(expected)
    assert prepared.wants_upload is (prepared.energy > expected)


def test_reference_reports_forced_after_c_skips() -> None:
    params = LazyParams(thr_scale=1e9, max_clock=2, warmup=0)
    reference = UploadReference([(3,)], UploadSettings(mode="bin", lazy=params))
    rng = np.random.default_rng(1)
    update = [np.array([1.0, 2.0, 3.0], np.float32)]  # sign leaves an error: threshold > 0
    offers = []
    for round_index in range(3):
        prepared = reference.prepare(update, round_index, rng)
        offers.append((prepared.wants_upload, prepared.forced, prepared.clock))
        reference.skip()
    assert offers == [(False, False, 0), (False, False, 1), (True, True, 2)]


def test_negative_or_nan_scalar_is_rejected() -> None:
    reference = UploadReference([(1,)], UploadSettings(mode="bbit"))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            reference.observe_scalar(bad)

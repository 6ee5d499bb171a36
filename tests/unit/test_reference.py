"""The worker's upload reference: prepare is pure, commit/skip advance as specified."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from flq.algorithm import LazyParams, Mode, UploadReference, UploadSettings
from flq.codec import Codec, decode
from flq.types import RoundConfig

SHAPES = [(4, 3), (3,)]


def _update(rng: np.random.Generator, scale: float = 1.0) -> list[np.ndarray]:
    return [(scale * rng.normal(size=s)).astype(np.float32) for s in SHAPES]


def _sq(arrays: list[np.ndarray]) -> float:
    return sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)


def _reference(mode: Mode, **kwargs: object) -> UploadReference:
    lazy = LazyParams(thr_scale=0.0, warmup=0)
    return UploadReference(SHAPES, UploadSettings(mode=mode, lazy=lazy, **kwargs))  # type: ignore[arg-type]


def _snapshot(reference: UploadReference) -> dict[str, object]:
    return copy.deepcopy(
        {
            "q": reference.q_hat,
            "residual": reference.residual,
            "err": reference.err_sq,
            "clock": reference.clock,
            "version": reference.version,
            "history": list(reference.history),
        }
    )


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list) and a[key] and isinstance(a[key][0], np.ndarray):  # type: ignore[index]
            for x, y in zip(a[key], b[key], strict=True):  # type: ignore[call-overload]
                np.testing.assert_array_equal(x, y)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("mode", ["fedavg", "laq8", "bbit", "bin"])
def test_prepare_does_not_mutate(mode: Mode) -> None:
    rng = np.random.default_rng(0)
    reference = _reference(mode)
    reference.commit(reference.prepare(_update(rng), 0, rng))
    reference.observe_scalar(0.3)
    before = _snapshot(reference)
    update = _update(rng)
    kept = copy.deepcopy(update)
    reference.prepare(update, 1, rng)
    _assert_same(before, _snapshot(reference))
    for u, k in zip(update, kept, strict=True):
        np.testing.assert_array_equal(u, k)


@pytest.mark.parametrize("mode", ["bbit", "bin"])
def test_innovation_commit_adds_decoded_delta(mode: Mode) -> None:
    rng = np.random.default_rng(1)
    reference = _reference(mode, b_up=3)
    reference.commit(reference.prepare(_update(rng), 0, rng))
    old_q = [q.copy() for q in reference.q_hat]
    update = _update(rng)
    prepared = reference.prepare(update, 1, rng)
    for enc, d, shape in zip(prepared.encoded, prepared.delta, SHAPES, strict=True):
        np.testing.assert_array_equal(decode(enc, shape), d)
    innovation = [u - q for u, q in zip(update, old_q, strict=True)]
    error = [v - d for v, d in zip(innovation, prepared.delta, strict=True)]
    assert prepared.energy == pytest.approx(
        sum(float(np.sum(d.astype(np.float64) ** 2)) for d in prepared.delta)
    )
    assert prepared.err_sq == pytest.approx(
        sum(float(np.sum(e.astype(np.float64) ** 2)) for e in error)
    )
    reference.commit(prepared)
    for q, old, d in zip(reference.q_hat, old_q, prepared.delta, strict=True):
        np.testing.assert_array_equal(q, old + d)
    assert (reference.version, reference.clock, reference.err_sq) == (2, 0, prepared.err_sq)


def test_bbit_error_is_within_half_a_grid_step() -> None:
    rng = np.random.default_rng(2)
    reference = _reference("bbit", b_up=4)
    update = _update(rng, scale=3.0)
    prepared = reference.prepare(update, 0, rng)
    for u, d in zip(update, prepared.delta, strict=True):
        tau_r = np.max(np.abs(u)) / (2**4 - 1)  # Q_hat is 0, so v = u and R = max|u|
        assert np.max(np.abs(u - d)) <= tau_r * (1 + 1e-5)
    assert all(e.codec == Codec.LAQ_GRID and e.bits == 4 for e in prepared.encoded)


def test_skip_only_ticks_the_clock() -> None:
    rng = np.random.default_rng(3)
    reference = _reference("bbit")
    reference.commit(reference.prepare(_update(rng), 0, rng))
    before = _snapshot(reference)
    reference.skip()
    reference.skip()
    after = _snapshot(reference)
    assert after.pop("clock") == 2
    before.pop("clock")
    _assert_same(before, after)


def test_stale_prepare_cannot_be_committed() -> None:
    rng = np.random.default_rng(4)
    reference = _reference("bbit")
    stale = reference.prepare(_update(rng), 0, rng)
    reference.commit(reference.prepare(_update(rng), 0, rng))
    with pytest.raises(ValueError, match="prepare again"):
        reference.commit(stale)


def test_fedavg_sends_the_exact_update_and_never_idles() -> None:
    rng = np.random.default_rng(5)
    settings = UploadSettings(mode="fedavg", lazy=LazyParams(thr_scale=1e9, warmup=0))
    reference = UploadReference(SHAPES, settings)
    update = _update(rng)
    prepared = reference.prepare(update, 3, rng)
    assert prepared.wants_upload and not prepared.forced
    assert prepared.err_sq == 0.0
    assert all(e.codec == Codec.FLOAT32 for e in prepared.encoded)
    for c, u in zip(prepared.candidate, update, strict=True):
        np.testing.assert_array_equal(c, u)


def test_laq8_error_feedback_carries_the_residual() -> None:
    rng = np.random.default_rng(6)
    reference = _reference("laq8", error_feedback=True)
    first_update = _update(rng)
    first = reference.prepare(first_update, 0, rng)
    reference.commit(first)
    assert first.residual is not None
    for r, u, c in zip(reference.residual, first_update, first.candidate, strict=True):
        np.testing.assert_array_equal(r, u - c)
        assert np.any(r != 0)  # 8-bit stochastic rounding leaves an error
    second_update = _update(rng)
    second = reference.prepare(second_update, 1, rng)
    # x = u + residual is what got quantized: Qnew + eps == x.
    assert second.residual is not None
    for u, r, c, e in zip(
        second_update, reference.residual, second.candidate, second.residual, strict=True
    ):
        np.testing.assert_allclose(c + e, u + r, rtol=0, atol=1e-6)
    # dQ is measured against the last acknowledged upload.
    for d, c, q in zip(second.delta, second.candidate, first.candidate, strict=True):
        np.testing.assert_array_equal(d, c - q)


def test_laq8_without_error_feedback_keeps_no_residual() -> None:
    rng = np.random.default_rng(7)
    reference = _reference("laq8", error_feedback=False)
    prepared = reference.prepare(_update(rng), 0, rng)
    reference.commit(prepared)
    assert prepared.residual is None and reference.residual == []
    assert all(e.codec == Codec.STOCHASTIC and e.bits == 8 for e in prepared.encoded)


def test_bad_updates_are_rejected() -> None:
    rng = np.random.default_rng(8)
    reference = _reference("bbit")
    with pytest.raises(ValueError, match="shapes"):
        reference.prepare([np.zeros((4, 3), np.float32)], 0, rng)
    bad = _update(rng)
    bad[1][0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reference.prepare(bad, 0, rng)


def test_built_from_round_config() -> None:
    config = RoundConfig(
        mode="bin",
        b_up=2,
        thr_scale=0.7,
        lazy_d=3,
        lazy_ck=0.5,
        lazy_c=9,
        warmup=1,
        stochastic_rounding=True,
        error_feedback=False,
    )
    reference = UploadReference.from_round_config([(2, 2)], config)
    assert reference.shapes == [(2, 2)]
    assert reference.config_key == UploadReference.key_for(config)
    assert reference.settings.lazy == LazyParams(0.7, 3, 0.5, 9, 1)
    assert UploadReference.key_for(RoundConfig(mode="bbit")) != reference.config_key
    with pytest.raises(ValueError, match="unknown mode"):
        UploadReference.key_for(RoundConfig(mode="bbits"))


def test_history_keeps_the_last_d_scalars() -> None:
    settings = UploadSettings(mode="bbit", lazy=LazyParams(history=2))
    reference = UploadReference(SHAPES, settings)
    for h in (1.0, 2.0, 3.0):
        reference.observe_scalar(h)
    assert list(reference.history) == [2.0, 3.0]

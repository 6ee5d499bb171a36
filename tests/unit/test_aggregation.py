"""Master-side contributions and the aggregate: mirror of the workers, stale reuse, FedAvg."""

from __future__ import annotations

import numpy as np
import pytest

from flq.algorithm import (
    AggregateOptions,
    ContributionStore,
    LazyParams,
    Mode,
    SampleWeighting,
    UniformWeighting,
    UploadReference,
    UploadSettings,
    aggregate,
    make_server_optimizer,
    make_weighting,
)
from flq.codec import encode_block_grid, encode_float32, encode_sign

SHAPES = [(5, 4), (4,), (2, 3, 2)]


def _update(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _settings(mode: Mode, thr_scale: float = 0.0, bbit_block: int = 0) -> UploadSettings:
    lazy = LazyParams(thr_scale=thr_scale, history=3, max_clock=4, warmup=1)
    return UploadSettings(mode=mode, b_up=3, lazy=lazy, error_feedback=True, bbit_block=bbit_block)


def _upload(
    store: ContributionStore,
    worker: str,
    reference: UploadReference,
    update: list[np.ndarray],
    round_index: int,
    rng: np.random.Generator,
) -> None:
    prepared = reference.prepare(update, round_index, rng)
    store.apply_upload(worker, prepared.encoded)
    reference.commit(prepared)


def _assert_mirrors(store: ContributionStore, worker: str, reference: UploadReference) -> None:
    assert store.version(worker) == reference.version
    stored = store.contribution(worker)
    if reference.version == 0:
        assert stored is None
        return
    assert stored is not None
    for q_master, q_worker in zip(stored, reference.q_hat, strict=True):
        np.testing.assert_array_equal(q_master, q_worker)  # bit-identical, not just close


@pytest.mark.parametrize(
    ("mode", "block"), [("fedavg", 0), ("laq8", 0), ("bbit", 0), ("bbit", 2), ("bin", 0)]
)
def test_store_mirrors_every_worker_reference(mode: Mode, block: int) -> None:
    rng = np.random.default_rng(42)
    workers = [f"w{i}" for i in range(4)]
    store = ContributionStore(SHAPES, mode, b_up=3, bbit_block=block)
    settings = _settings(mode, thr_scale=0.5, bbit_block=block)
    references = {w: UploadReference(SHAPES, settings) for w in workers}
    lazy_offers = uploads = 0
    for round_index in range(40):
        for worker in workers:
            reference = references[worker]
            # h on the scale of the innovation energy, so offers mix eager and lazy ones
            reference.observe_scalar(float(rng.uniform(0, 400)))
            prepared = reference.prepare(_update(rng), round_index, rng)
            lazy_offers += not prepared.wants_upload
            granted = prepared.wants_upload and rng.random() < 0.6
            if granted:
                uploads += 1
                store.apply_upload(worker, prepared.encoded)
                reference.commit(prepared)
            else:
                reference.skip()
            if rng.random() < 0.03:  # reference reset on both sides (reconnect mismatch)
                references[worker] = UploadReference(SHAPES, settings)
                store.reset(worker)
            _assert_mirrors(store, worker, references[worker])
    assert uploads > 20
    assert (lazy_offers > 0) is (mode != "fedavg")


def test_stale_contribution_keeps_counting() -> None:
    rng = np.random.default_rng(0)
    store = ContributionStore(SHAPES, "bbit", b_up=3)
    refs = {w: UploadReference(SHAPES, _settings("bbit")) for w in ("a", "b")}
    for worker, reference in refs.items():
        _upload(store, worker, reference, _update(rng), 0, rng)
    # Round 1: only b uploads; a's round-0 contribution is reused as is.
    _upload(store, "b", refs["b"], _update(rng), 1, rng)
    refs["a"].skip()
    result = aggregate(store, UniformWeighting(), {}, fresh={"b"})
    expected = [(qa + qb) / 2 for qa, qb in zip(refs["a"].q_hat, refs["b"].q_hat, strict=True)]
    for got, want in zip(result.delta, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (result.contributors, result.fresh) == (2, 1)
    assert result.weights == {"a": 0.5, "b": 0.5}


def test_reset_and_remove() -> None:
    rng = np.random.default_rng(1)
    store = ContributionStore(SHAPES, "bin")
    for worker in ("a", "b"):
        _upload(store, worker, UploadReference(SHAPES, _settings("bin")), _update(rng), 0, rng)
    store.reset("a")
    assert store.version("a") == 0 and store.contribution("a") is None and "a" in store
    assert store.contributors() == ["b"]
    store.remove("b")
    assert "b" not in store and store.version("b") == 0 and store.contributors() == []
    result = aggregate(store, SampleWeighting(), {"a": 3}, fresh=set())
    assert result.contributors == 0 and result.lazy_scalar == 0.0
    assert all(not np.any(d) for d in result.delta)
    # After a reset the next upload starts again from zeros.
    reference = UploadReference(SHAPES, _settings("bin"))
    _upload(store, "a", reference, _update(rng), 1, rng)
    _assert_mirrors(store, "a", reference)


def test_fedavg_property() -> None:
    """fedavg, everyone granted, lazy off: the aggregate is the sample-weighted mean of the raw
    deltas and the `avg` optimizer lands on theta + that mean."""
    rng = np.random.default_rng(2)
    samples = {"a": 10, "b": 30, "c": 60}
    store = ContributionStore(SHAPES, "fedavg")
    deltas = {w: _update(rng) for w in samples}
    for round_index, (worker, delta) in enumerate(deltas.items()):
        _upload(
            store, worker, UploadReference(SHAPES, _settings("fedavg")), delta, round_index, rng
        )
    result = aggregate(store, SampleWeighting(), samples, fresh=set(samples))
    expected = [
        sum(samples[w] / 100 * deltas[w][i].astype(np.float64) for w in samples) for i in range(3)
    ]
    for got, want in zip(result.delta, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert result.weights == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    theta = _update(rng)
    stepped = make_server_optimizer("avg", lr=123.0).step(theta, result.delta)
    for new, old, want in zip(stepped, theta, expected, strict=True):
        np.testing.assert_allclose(new, old + want, rtol=1e-6, atol=1e-6)


def _store_with(contributions: dict[str, list[np.ndarray]]) -> ContributionStore:
    store = ContributionStore(SHAPES, "fedavg")
    for worker, values in contributions.items():
        store.apply_upload(worker, [encode_float32(v) for v in values])
    return store


def test_lazy_scalar_clip_and_selected_scaling() -> None:
    ones = [np.ones(s, np.float32) for s in SHAPES]
    store = _store_with({"a": ones, "b": [3 * o for o in ones]})
    size = sum(int(np.prod(s)) for s in SHAPES)  # 34 values, mean is 2 everywhere
    plain = aggregate(store, UniformWeighting(), {}, fresh={"a"})
    assert plain.lazy_scalar == pytest.approx(4.0 * size)
    assert plain.scale == 1.0
    scaled = aggregate(
        store, UniformWeighting(), {}, {"a"}, AggregateOptions(scale_by_selected=True)
    )
    assert scaled.scale == pytest.approx(0.5)
    np.testing.assert_allclose(scaled.delta[0], 1.0)
    assert scaled.lazy_scalar == plain.lazy_scalar  # h is taken before scaling
    clipped = aggregate(store, UniformWeighting(), {}, {"a"}, AggregateOptions(clip_global=1.5))
    norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in clipped.delta))
    assert norm == pytest.approx(1.5, rel=1e-6)
    loose = aggregate(store, UniformWeighting(), {}, {"a"}, AggregateOptions(clip_global=1e6))
    assert loose.scale == 1.0
    both = AggregateOptions(clip_global=1.5, scale_by_selected=True, sel_ref=4.0)
    result = aggregate(store, UniformWeighting(), {}, {"a", "b"}, both)
    norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in result.delta))
    assert norm == pytest.approx(1.5, rel=1e-6)  # clipping is last, so the bound holds


def test_weighting_rules() -> None:
    assert make_weighting("samples").weights(["a", "b"], {"a": 4}) == {"a": 4.0, "b": 0.0}
    assert make_weighting("uniform").weights(["a", "b"], {"a": 4}) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="unknown weighting"):
        make_weighting("llm")
    ones = [np.ones(s, np.float32) for s in SHAPES]
    store = _store_with({"a": ones, "b": [3 * o for o in ones]})
    # No sample counts yet: uniform rather than a division by zero.
    assert aggregate(store, SampleWeighting(), {}, set()).weights == {"a": 0.5, "b": 0.5}

    class Proposal:
        name = "proposal"

        def weights(self, worker_ids: object, samples: object) -> dict[str, float]:
            return {"b": 3.0, "ghost": 100.0}  # leaves out a, names a non-contributor

    assert aggregate(store, Proposal(), {}, set()).weights == {"a": 0.0, "b": 1.0}

    class Negative:
        name = "negative"

        def weights(self, worker_ids: object, samples: object) -> dict[str, float]:
            return {"a": -1.0, "b": 2.0}

    with pytest.raises(ValueError, match="finite and >= 0"):
        aggregate(store, Negative(), {}, set())


def test_wrong_upload_is_rejected_and_changes_nothing() -> None:
    store = ContributionStore(SHAPES, "bbit", b_up=3)
    values = [np.ones(s, np.float32) for s in SHAPES]
    with pytest.raises(ValueError, match="codec"):
        store.apply_upload("a", [encode_sign(v) for v in values])
    with pytest.raises(ValueError, match="tensors"):
        store.apply_upload("a", [])
    assert "a" not in store and store.version("a") == 0


def test_block_grid_uploads_must_match_the_runs_grid_and_block() -> None:
    values = [np.ones(s, np.float32) for s in SHAPES]
    laq_store = ContributionStore(SHAPES, "bbit", b_up=3)
    block_store = ContributionStore(SHAPES, "bbit", b_up=3, bbit_block=4)
    with pytest.raises(ValueError, match="codec BLOCK_GRID, mode bbit sends LAQ_GRID"):
        laq_store.apply_upload("a", [encode_block_grid(v, 3, 4) for v in values])
    with pytest.raises(ValueError, match=r"block size .*bbit_block is 4"):
        block_store.apply_upload("a", [encode_block_grid(v, 3, 8) for v in values])
    assert "a" not in laq_store and "a" not in block_store
    block_store.apply_upload("a", [encode_block_grid(v, 3, 4) for v in values])
    stored = block_store.contribution("a")
    assert stored is not None and all(
        np.array_equal(q, v) for q, v in zip(stored, values, strict=True)
    )


def test_state_round_trip_gives_identical_behaviour() -> None:
    rng = np.random.default_rng(3)
    store = ContributionStore(SHAPES, "bbit", b_up=3)
    refs = {w: UploadReference(SHAPES, _settings("bbit")) for w in ("a", "b/c", "d")}
    for round_index in range(3):
        for worker, reference in refs.items():
            _upload(store, worker, reference, _update(rng), round_index, rng)
    store.reset("d")
    store.record_weights({"a": 0.25, "b/c": 0.75})
    restored = ContributionStore(SHAPES, "bbit", b_up=3)
    restored.load_state(store.state())
    upload = refs["a"].prepare(_update(rng), 4, rng)
    for s in (store, restored):
        s.apply_upload("a", upload.encoded)
    for s in (store, restored):
        assert s.weight_used("b/c") == 0.75
    one = aggregate(store, SampleWeighting(), {"a": 1, "b/c": 2}, {"a"})
    two = aggregate(restored, SampleWeighting(), {"a": 1, "b/c": 2}, {"a"})
    assert one.weights == two.weights and one.lazy_scalar == two.lazy_scalar
    for x, y in zip(one.delta, two.delta, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [restored.version(w) for w in refs] == [4, 3, 0]
    with pytest.raises(ValueError, match="mode"):
        ContributionStore(SHAPES, "bin").load_state(store.state())

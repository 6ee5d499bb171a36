"""Sparse ternary compression: Golomb-coded positions, the STC mode's residual, its aggregate
and its downlink."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flq.algorithm import (
    ContributionStore,
    DownlinkReceiver,
    DownlinkSender,
    LazyParams,
    SampleWeighting,
    UploadReference,
    UploadSettings,
    aggregate,
)
from flq.algorithm.stc import kept_count, sparsify
from flq.codec import (
    Codec,
    CodecError,
    EncodedTensor,
    decode,
    encode,
    gapclass,
    header_bits,
    sparse,
    validate,
)

SHAPES = [(40, 25), (25,), (7, 3, 3)]
TOTAL = sum(math.prod(s) for s in SHAPES)


def _positions(rng: np.random.Generator, count: int, nnz: int) -> np.ndarray:
    return np.sort(rng.choice(count, size=nnz, replace=False)).astype(np.int64)


# ---------------------------------------------------------------- the code


@pytest.mark.parametrize("b", [0, 1, 3, 6, 8, 12])
@pytest.mark.parametrize(("count", "nnz"), [(1, 0), (1, 1), (10, 10), (1000, 7), (5000, 250)])
def test_positions_round_trip_bit_exactly_and_the_size_is_the_counted_one(
    b: int, count: int, nnz: int
) -> None:
    rng = np.random.default_rng(count * 31 + nnz + b)
    positions = _positions(rng, count, nnz)
    positive = rng.random(nnz) < 0.5
    data = sparse.encode_positions(positions, positive, b)
    assert len(data) == -(-sparse.coded_bits(positions, b) // 8)
    assert len(data) <= sparse.max_payload_bytes(b, nnz, count)
    got_positions, got_positive = sparse.decode_positions(data, b, nnz, count)
    np.testing.assert_array_equal(got_positions, positions)
    np.testing.assert_array_equal(got_positive, positive)


def test_the_rice_parameter_is_the_papers_and_near_the_best_for_its_density() -> None:
    rng = np.random.default_rng(0)
    assert (sparse.rice_bits(0.01), sparse.rice_bits(0.0025)) == (6, 8)
    for density in (0.0025, 0.01, 0.05, 0.2):
        positions = np.flatnonzero(rng.random(200_000) < density)
        best = min(sparse.coded_bits(positions, b) for b in range(16))
        assert sparse.coded_bits(positions, sparse.rice_bits(density)) <= 1.01 * best
        per_value = sparse.coded_bits(positions, sparse.rice_bits(density)) / positions.size
        assert per_value == pytest.approx(sparse.expected_bits_per_nonzero(density), rel=0.02)


def test_a_tensor_encodes_its_top_values_as_plus_minus_mu() -> None:
    x = np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)
    enc = encode(Codec.SPARSE_TERNARY, x, 0, density=0.01)
    validate(enc, x.shape)
    kept = np.argsort(-np.abs(x), axis=None)[:20]
    mu = float(np.abs(x.reshape(-1)[kept]).mean())
    assert enc.scales == (pytest.approx(mu, rel=1e-6), 20.0)
    expected = np.zeros(x.size, np.float32)
    expected[kept] = np.sign(x.reshape(-1)[kept]) * np.float32(enc.scales[0])
    np.testing.assert_array_equal(decode(enc, x.shape).reshape(-1), expected)
    assert enc.cost_bits() == 8 * len(enc.data) + header_bits(2, 2)


def _tensor(data: bytes, bits: int, mu: float, nnz: float, shape: tuple[int, ...]) -> EncodedTensor:
    return EncodedTensor(Codec.SPARSE_TERNARY, shape, bits, (mu, nnz), data)


def test_malformed_payloads_are_refused_with_the_field_named() -> None:
    positions = np.array([3, 9, 40], np.int64)
    good = sparse.encode_positions(positions, np.array([True, False, True]), 2)
    validate(_tensor(good, 2, 0.5, 3, (50,)))
    cases = [
        (_tensor(good[:-1], 2, 0.5, 3, (50,)), r"payload"),
        (_tensor(good + b"\0", 2, 0.5, 3, (50,)), r"^payload length"),
        (_tensor(good, 2, 0.5, 2, (50,)), r"^payload length"),  # one codeword left over
        (_tensor(good, 2, 0.5, 3, (40,)), r"^payload positions: got 40, expected < 40"),
        (_tensor(good, 2, 0.5, 3.5, (50,)), r"^scales\[nnz\]"),
        (_tensor(good, 2, 0.5, 51, (50,)), r"^scales\[nnz\]"),
        (_tensor(good, 2, math.nan, 3, (50,)), r"^scales\[mu\]"),
        (_tensor(good, 2, -1.0, 3, (50,)), r"^scales\[mu\]"),
        (_tensor(good, 25, 0.5, 3, (50,)), r"^bits: got 25"),
        (_tensor(good[:2] + bytes([good[2] | 0x80]), 2, 0.5, 3, (50,)), r"^payload length"),
    ]
    for tensor, message in cases:
        with pytest.raises(CodecError, match=message):
            validate(tensor)


# ---------------------------------------------------------------- the mode


def _update(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def test_sparsify_keeps_the_top_values_over_the_whole_model() -> None:
    rng = np.random.default_rng(2)
    values = _update(rng)
    values[1] *= 10  # the small tensor holds the largest values: a per-tensor top-k would not
    encoded = sparsify(values, 0.02, per_tensor=False)
    k = round(0.02 * TOTAL)
    assert kept_count(encoded) == k
    flat = np.concatenate([v.reshape(-1) for v in values])
    top = np.sort(np.argsort(-np.abs(flat))[:k])
    decoded = np.concatenate(
        [decode(e, s).reshape(-1) for e, s in zip(encoded, SHAPES, strict=True)]
    )
    np.testing.assert_array_equal(np.flatnonzero(decoded), top)
    mu = np.float32(np.abs(flat[top]).mean(dtype=np.float64))
    np.testing.assert_array_equal(decoded[top], np.sign(flat[top]) * mu)


def test_per_tensor_scope_gives_every_tensor_its_own_top_values_and_mu() -> None:
    rng = np.random.default_rng(2)
    values = _update(rng)
    values[1] *= 10  # over the whole model the other tensors would lose their share to this one
    encoded = sparsify(values, 0.02)  # per tensor: the default, as STC's reference code
    assert [int(e.scales[1]) for e in encoded] == [20, 1, 2]  # ceil(0.02 * n) each
    assert kept_count(encoded) == 23 > round(0.02 * TOTAL)
    for value, tensor, shape in zip(values, encoded, SHAPES, strict=True):
        flat = value.reshape(-1)
        k = math.ceil(0.02 * flat.size)
        top = np.sort(np.argsort(-np.abs(flat))[:k])
        decoded = decode(tensor, shape).reshape(-1)
        np.testing.assert_array_equal(np.flatnonzero(decoded), top)
        mu = np.float32(np.abs(flat[top]).mean(dtype=np.float64))  # this tensor's own mu
        np.testing.assert_array_equal(decoded[top], np.sign(flat[top]) * mu)
    # The master holds each scope to its own allowance: a per-tensor upload keeps more values
    # than a model-scope one may.
    whole = ContributionStore(SHAPES, "stc", density=0.02, per_tensor=False)
    with pytest.raises(ValueError, match=r"keeps 23 values, density 0\.02 allows 22"):
        whole.check(encoded)
    ContributionStore(SHAPES, "stc", density=0.02).check(encoded)


def _stc_reference(**kwargs: object) -> UploadReference:
    lazy = LazyParams(thr_scale=0.0, warmup=0)
    settings = UploadSettings(mode="stc", lazy=lazy, density=0.05, **kwargs)  # type: ignore[arg-type]
    return UploadReference(SHAPES, settings)


def test_a_model_scope_worker_sends_one_top_k_that_the_master_accepts() -> None:
    # The worker once dropped sparse_scope on its way to the codec (0aa842e): every tensor kept
    # its own top ceil(p*n), more than model scope allows, and the master refused each upload.
    rng = np.random.default_rng(2)
    values = _update(rng)
    values[1] *= 10
    prepared = _stc_reference(per_tensor=False).prepare(values, 0, rng)
    assert kept_count(prepared.encoded) == round(0.05 * TOTAL)
    assert int(prepared.encoded[1].scales[1]) > math.ceil(0.05 * 25)  # more than its own share
    assert len({e.scales[0] for e in prepared.encoded if e.scales[1]}) == 1  # one mu
    ContributionStore(SHAPES, "stc", density=0.05, per_tensor=False).check(prepared.encoded)


def test_the_residual_keeps_exactly_what_was_not_sent_and_survives_skipped_rounds() -> None:
    rng = np.random.default_rng(3)
    reference = _stc_reference()
    sent_total = [np.zeros(s, np.float64) for s in SHAPES]
    update_total = [np.zeros(s, np.float64) for s in SHAPES]
    for round_index in range(6):
        update = _update(rng)
        before = [r.copy() for r in reference.residual]
        prepared = reference.prepare(update, round_index, rng)
        sent = [decode(e, s) for e, s in zip(prepared.encoded, SHAPES, strict=True)]
        assert kept_count(prepared.encoded) == sum(math.ceil(0.05 * math.prod(s)) for s in SHAPES)
        # the contribution is the upload itself
        for d, s in zip(prepared.delta, sent, strict=True):
            np.testing.assert_array_equal(d, s)
        if round_index == 2:  # lazy or denied: nothing sent, residual and update untouched
            reference.skip()
            for r, b in zip(reference.residual, before, strict=True):
                np.testing.assert_array_equal(r, b)
            continue
        reference.commit(prepared)
        for r, u, b, s in zip(reference.residual, update, before, sent, strict=True):
            # residual' = update + residual - sent, exactly where nothing was sent
            np.testing.assert_allclose(r, u + b - s, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(r[s == 0], (u + b)[s == 0])
        for total, u in zip(update_total, update, strict=True):
            total += u
        for total, s in zip(sent_total, sent, strict=True):
            total += s
    # error accumulation: everything committed rounds computed was sent or is still held
    for u, s, r in zip(update_total, sent_total, reference.residual, strict=True):
        np.testing.assert_allclose(u - s, r, rtol=0, atol=1e-4)


def test_without_error_feedback_nothing_is_carried() -> None:
    rng = np.random.default_rng(4)
    reference = _stc_reference(error_feedback=False)
    reference.commit(reference.prepare(_update(rng), 0, rng))
    assert reference.residual == []


def test_the_master_counts_stc_uploads_only_in_their_own_round() -> None:
    rng = np.random.default_rng(5)
    store = ContributionStore(SHAPES, "stc", density=0.05)
    uploads = {w: sparsify(_update(rng), 0.05) for w in ("a", "b")}
    for worker, encoded in uploads.items():
        store.apply_upload(worker, encoded)
    samples = {"a": 1, "b": 3}
    both = aggregate(store, SampleWeighting(), samples, fresh={"a", "b"})
    only_b = aggregate(store, SampleWeighting(), samples, fresh={"b"})
    assert both.contributors == 2 and only_b.contributors == 1
    for got, shape, a, b in zip(both.delta, SHAPES, uploads["a"], uploads["b"], strict=True):
        expected = 0.25 * decode(a, shape).astype(np.float64) + 0.75 * decode(b, shape)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    for got, shape, b in zip(only_b.delta, SHAPES, uploads["b"], strict=True):
        np.testing.assert_array_equal(got, decode(b, shape))
    with pytest.raises(ValueError, match=r"keeps .* values, density 0.01 allows"):
        ContributionStore(SHAPES, "stc", density=0.01).check(uploads["a"])


def test_sparse_downlink_is_rebuilt_bit_exactly_with_chains_for_missed_rounds() -> None:
    rng = np.random.default_rng(6)
    sender = DownlinkSender(b_down=32, density=0.05)
    steady, flaky = DownlinkReceiver(), DownlinkReceiver()
    theta = _update(rng)
    kinds = []
    for round_index in range(8):
        theta = [t + 0.1 * rng.standard_normal(t.shape).astype(np.float32) for t in theta]
        sent = sender.prepare(theta)
        for receiver in (steady, flaky) if round_index not in (3, 4) else (steady,):
            encoded, is_keyframe = sent.payload_for(receiver.version)
            if receiver is flaky:
                kinds.append((is_keyframe, len(encoded) // len(SHAPES)))
            receiver.apply(encoded, is_keyframe, sent.version)
            assert receiver.version == sender.version
            for got, want in zip(receiver.weights, sender.reference or [], strict=True):
                np.testing.assert_array_equal(got, want)
        if round_index:
            assert sent.delta is not None
            assert all(e.codec == Codec.SPARSE_TERNARY for e in sent.delta)
    # a keyframe first, single deltas, then the three deltas it missed in one chain
    assert kinds == [(True, 1), (False, 1), (False, 1), (False, 3), (False, 1), (False, 1)]
    # what the reference has not yet caught up with stays in theta - theta_ref for later rounds
    gap = sum(
        float(np.sum((t - r) ** 2)) for t, r in zip(theta, sender.reference or [], strict=True)
    )
    assert 0 < gap < sum(float(np.sum(t**2)) for t in theta)


def test_sti_sends_sparse_innovations_the_master_mirrors_and_reuses() -> None:
    rng = np.random.default_rng(7)
    lazy = LazyParams(thr_scale=0.0, warmup=0)
    settings = UploadSettings(mode="sti", lazy=lazy, density=0.05)
    reference = UploadReference(SHAPES, settings)
    store = ContributionStore(SHAPES, "sti", density=0.05)
    target = _update(rng)
    for round_index in range(5):
        prepared = reference.prepare(target, round_index, rng)
        assert kept_count(prepared.encoded) == sum(math.ceil(0.05 * math.prod(s)) for s in SHAPES)
        store.apply_upload("a", prepared.encoded)
        reference.commit(prepared)
        for q_master, q_worker in zip(store.contribution("a") or [], reference.q_hat, strict=True):
            np.testing.assert_array_equal(q_master, q_worker)
    # Q_hat closes in on a fixed update round by round: what one upload left out, later ones send
    gap = sum(float(np.sum((t - q) ** 2)) for t, q in zip(target, reference.q_hat, strict=True))
    assert gap < 0.9 * sum(float(np.sum(t**2)) for t in target)
    # a worker that does not upload keeps counting with its last Q_i (stale reuse)
    result = aggregate(store, SampleWeighting(), {"a": 1}, fresh=set())
    assert result.contributors == 1


# ---------------------------------------------------------------- the gap-class code


def _clustered(rng: np.random.Generator, count: int, nnz: int) -> np.ndarray:
    """Positions in a few dense runs plus scattered ones: how a CNN update's top values sit."""
    runs = [rng.integers(0, count - 200) + np.arange(0, 200, 2) for _ in range(nnz // 200)]
    scattered = rng.choice(count, size=nnz // 2, replace=False)
    return np.unique(np.concatenate([*runs, scattered]))


def test_gap_classes_are_exact_floor_log2() -> None:
    gaps = np.array([0, 1, 2, 3, 6, 7, 2**20 - 2, 2**20 - 1, 2**31 - 1], dtype=np.int64)
    expected = [int(np.floor(np.log2(float(g) + 1))) for g in gaps.tolist()]
    assert gapclass.classes_of(gaps).tolist() == expected


@pytest.mark.parametrize("seed", range(4))
def test_clustered_positions_take_the_class_code_and_round_trip_bit_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = 60_000
    positions = _clustered(rng, count, 800)
    positive = rng.random(positions.size) < 0.5
    tensor = sparse.ternary_tensor((count,), positions, positive, 0.25)
    assert tensor.codec == Codec.SPARSE_TERNARY_GAPCLASS
    _, _, planned = gapclass.plan(np.diff(positions, prepend=-1) - 1)
    assert len(tensor.data) == -(-planned // 8)  # the counted size is the coded size
    golomb = sparse.coded_bits(positions, sparse.rice_bits(positions.size / count))
    assert 8 * len(tensor.data) < golomb  # sent because it is smaller
    decoded = decode(tensor, (count,))
    assert np.flatnonzero(decoded).tolist() == positions.tolist()
    np.testing.assert_array_equal(decoded[positions] > 0, positive)
    assert tensor.cost_bits() == 8 * len(tensor.data) + header_bits(1, 2)


def test_scattered_positions_keep_golomb_rice() -> None:
    rng = np.random.default_rng(9)
    positions = _positions(rng, 100_000, 1000)
    tensor = sparse.ternary_tensor((100_000,), positions, np.ones(1000, bool), 1.0)
    assert tensor.codec == Codec.SPARSE_TERNARY


def test_malformed_class_code_payloads_are_refused() -> None:
    rng = np.random.default_rng(10)
    positions = _clustered(rng, 20_000, 400)
    good = sparse.ternary_tensor((20_000,), positions, np.ones(positions.size, bool), 1.0)
    assert good.codec == Codec.SPARSE_TERNARY_GAPCLASS
    validate(good)
    nnz = positions.size

    def variant(data: bytes, bits: int = good.bits, nnz: float = nnz) -> EncodedTensor:
        return EncodedTensor(good.codec, good.shape, bits, (1.0, nnz), data)

    table = bytearray(good.data)
    table[0] = 0x11  # classes 0 and 1 get 1-bit codes, the rest keep theirs: not a prefix code
    cases = [
        (variant(good.data[:-1]), r"payload"),
        (variant(good.data + b"\0"), r"^payload length"),
        (variant(good.data, nnz=nnz - 1), r"^payload length"),
        (variant(bytes(table)), r"^payload code table"),
        (variant(good.data, bits=33), r"^bits: got 33"),
        (EncodedTensor(good.codec, (positions[-1],), good.bits, (1.0, nnz), good.data), r"posit"),
    ]
    for tensor, message in cases:
        with pytest.raises(CodecError, match=message):
            validate(tensor)


def test_golomb_only_is_the_papers_code_and_the_master_holds_workers_to_it() -> None:
    rng = np.random.default_rng(11)
    values = [np.zeros(s, np.float32) for s in SHAPES]
    values[0].reshape(-1)[:60] = rng.standard_normal(60)  # clustered: gap classes would win
    best, golomb = sparsify(values, 0.05), sparsify(values, 0.05, gap_classes=False)
    assert best[0].codec == Codec.SPARSE_TERNARY_GAPCLASS
    assert all(e.codec == Codec.SPARSE_TERNARY for e in golomb)
    for a, b, shape in zip(best, golomb, SHAPES, strict=True):
        np.testing.assert_array_equal(decode(a, shape), decode(b, shape))  # lossless either way
    ContributionStore(SHAPES, "stc", density=0.05, gap_classes=False).check(golomb)
    with pytest.raises(ValueError, match="codec SPARSE_TERNARY_GAPCLASS, mode stc sends"):
        ContributionStore(SHAPES, "stc", density=0.05, gap_classes=False).check(best)

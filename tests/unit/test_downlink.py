"""The shared downlink reference: every worker rebuilds exactly the master's theta_ref."""

from __future__ import annotations

import numpy as np
import pytest

from flq.algorithm import DownlinkReceiver, DownlinkSender
from flq.codec import Codec

SHAPES = [(6, 5), (5,)]


def _walk(rng: np.random.Generator, rounds: int) -> list[list[np.ndarray]]:
    theta = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    path = []
    for _ in range(rounds):
        theta = [t + 0.1 * rng.normal(size=t.shape).astype(np.float32) for t in theta]
        path.append(theta)
    return path


def _assert_holds(receiver: DownlinkReceiver, sender: DownlinkSender) -> None:
    assert receiver.version == sender.version
    assert sender.reference is not None
    for got, want in zip(receiver.weights, sender.reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_workers_rebuild_the_reference_incl_late_joiner_and_missed_round() -> None:
    rng = np.random.default_rng(0)
    sender = DownlinkSender(b_down=4)
    steady, late, flaky = DownlinkReceiver(), DownlinkReceiver(), DownlinkReceiver()
    kinds: dict[str, list[bool]] = {"steady": [], "late": [], "flaky": []}
    for round_index, theta in enumerate(_walk(rng, 8)):
        sent = sender.prepare(theta)
        present = {"steady": steady}
        if round_index >= 3:
            present["late"] = late
        if round_index != 5:
            present["flaky"] = flaky
        for name, receiver in present.items():
            encoded, is_keyframe = sent.payload_for(receiver.version)
            kinds[name].append(is_keyframe)
            receiver.apply(encoded, is_keyframe, sent.version)
            _assert_holds(receiver, sender)
    assert kinds["steady"] == [True] + [False] * 7
    assert kinds["late"] == [True] + [False] * 4
    # the round it missed comes as a chain of two deltas, cheaper than a keyframe
    assert kinds["flaky"] == [True, False, False, False, False, False, False]


def test_a_chain_costlier_than_a_keyframe_or_from_before_a_restart_is_a_keyframe() -> None:
    rng = np.random.default_rng(4)
    sender = DownlinkSender(b_down=12)  # 12-bit deltas: three cost more than a float32 keyframe
    path = _walk(rng, 5)
    for theta in path[:4]:
        sent = sender.prepare(theta)
    assert sent.payload_for(sent.version - 3)[1] is True
    assert sent.payload_for(sent.version - 2)[1] is False
    restored = DownlinkSender(b_down=12)
    restored.load_state(sender.state())
    after = restored.prepare(path[4])
    assert after.payload_for(after.version - 1)[1] is False
    assert after.payload_for(after.version - 2)[1] is True  # no cache across a restart


def test_reference_tracks_theta_within_the_grid_error() -> None:
    rng = np.random.default_rng(1)
    sender = DownlinkSender(b_down=8)
    for theta in _walk(rng, 5):
        previous = sender.reference
        round_ = sender.prepare(theta)
        assert sender.reference is not None
        if previous is None:
            assert round_.delta is None
            continue
        assert round_.delta is not None
        assert all(e.codec == Codec.LAQ_GRID and e.bits == 8 for e in round_.delta)
        for t, prev, ref in zip(theta, previous, sender.reference, strict=True):
            grid_step = np.max(np.abs(t - prev)) / (2**8 - 1)
            assert np.max(np.abs(t - ref)) <= grid_step * (1 + 1e-4)


def test_keyframe_carries_the_reference_not_theta_and_is_cached() -> None:
    rng = np.random.default_rng(2)
    sender = DownlinkSender(b_down=2)
    path = _walk(rng, 2)
    sender.prepare(path[0])
    second = sender.prepare(path[1])
    encoded, is_keyframe = second.payload_for(worker_version=-1)
    assert is_keyframe and all(e.codec == Codec.FLOAT32 for e in encoded)
    assert second.payload_for(0)[0] is encoded  # encoded once, shared
    receiver = DownlinkReceiver()
    weights = receiver.apply(encoded, True, second.version)
    assert sender.reference is not None
    for got, ref, theta in zip(weights, sender.reference, path[1], strict=True):
        np.testing.assert_array_equal(got, ref)
        assert not np.array_equal(got, theta)  # 2-bit deltas cannot land on theta exactly


def test_b_down_32_sends_theta_as_float32_to_everyone() -> None:
    rng = np.random.default_rng(3)
    sender = DownlinkSender(b_down=32)
    receiver = DownlinkReceiver()
    for theta in _walk(rng, 3):
        sent = sender.prepare(theta)
        assert sent.delta is None
        encoded, is_keyframe = sender.payload_for(receiver.version)
        assert is_keyframe and all(e.codec == Codec.FLOAT32 for e in encoded)
        for got, want in zip(
            receiver.apply(encoded, is_keyframe, sent.version), theta, strict=True
        ):
            np.testing.assert_array_equal(got, want)
        _assert_holds(receiver, sender)


def test_delta_without_the_previous_version_is_refused() -> None:
    rng = np.random.default_rng(4)
    sender = DownlinkSender(b_down=4)
    path = _walk(rng, 3)
    receiver = DownlinkReceiver()
    first = sender.prepare(path[0])
    receiver.apply(*first.payload_for(receiver.version), first.version)
    sender.prepare(path[1])  # the receiver misses this round
    third = sender.prepare(path[2])
    assert third.delta is not None
    with pytest.raises(ValueError, match=r"expected 2 rounds of 2 \(from version 1 to 3\)"):
        receiver.apply(third.delta, False, third.version)
    with pytest.raises(ValueError, match="needs an older version, this worker holds nothing"):
        DownlinkReceiver().apply(third.delta, False, third.version)
    with pytest.raises(ValueError, match="no downlink"):
        _ = DownlinkReceiver().weights


def test_state_round_trip_gives_identical_rounds() -> None:
    rng = np.random.default_rng(5)
    path = _walk(rng, 5)
    sender = DownlinkSender(b_down=3)
    for theta in path[:3]:
        sender.prepare(theta)
    restored = DownlinkSender(b_down=8)
    restored.load_state(sender.state())
    for theta in path[3:]:
        a, b = sender.prepare(theta), restored.prepare(theta)
        assert a.version == b.version and a.delta is not None and b.delta is not None
        assert [e.data for e in a.delta] == [e.data for e in b.delta]
        assert [e.data for e in a.keyframe] == [e.data for e in b.keyframe]
    empty = DownlinkSender(b_down=3)
    empty.load_state(DownlinkSender(b_down=3).state())
    assert empty.reference is None and empty.version == 0

"""The worker registry: identity across sessions, one place for the counters, the wait."""

from __future__ import annotations

import asyncio

import pytest

from flq.master.outcome import RoundOutcome
from flq.master.registry import Registry
from flq.memlink import memory_link_pair
from flq.types import PROTOCOL_VERSION, Hello


def _hello(worker_id: str, samples: int = 10) -> Hello:
    return Hello(worker_id, PROTOCOL_VERSION, samples)


def test_a_new_session_replaces_the_old_and_the_old_one_detaching_changes_nothing() -> None:
    registry = Registry()
    first, _ = memory_link_pair("w0")
    second, _ = memory_link_pair("w0")
    record, replaced = registry.attach(_hello("w0", 10), first)
    again, replaced = registry.attach(_hello("w0", 20), second)
    assert again is record and replaced is first and record.num_samples == 20
    registry.detach(first)  # the replaced session ending late
    assert record.link is second and registry.connected() == [record]
    registry.detach(second)
    assert registry.connected() == [] and registry.get("w0") is record  # kept for its return


def test_record_round_is_the_one_place_counters_change() -> None:
    registry = Registry()
    for worker_id in ("w0", "w1", "w2", "w3"):
        registry.attach(_hello(worker_id), memory_link_pair(worker_id)[0])
    outcome = RoundOutcome(
        round=7,
        skipped=["w1"],
        denied={"w2": "budget", "w3": "top-k"},
        failed={"w3": "deadline"},  # denied, but the Decision never reached it
        upload_bits={"w0": 1200},
        train_losses={"w0": 0.5, "w1": 0.7},
    )
    registry.record_round(outcome)
    w0, w1, w2, w3 = (registry.get(w) for w in ("w0", "w1", "w2", "w3"))
    assert w0 is not None and w1 is not None and w2 is not None and w3 is not None
    assert (w0.uploads, w0.uplink_bits, w0.last_upload_round) == (1, 1200, 7)
    assert list(w0.recent_losses) == [0.5] and list(w1.recent_losses) == [0.7]
    assert (w1.skips, w2.skips, w3.skips) == (1, 1, 0)
    assert (w0.failures, w3.failures) == (0, 1)


def test_record_round_refuses_a_worker_it_never_met_and_changes_nothing() -> None:
    registry = Registry()
    with pytest.raises(KeyError, match="'ghost'"):
        registry.record_round(RoundOutcome(round=1, upload_bits={"ghost": 8}))
    assert registry.all() == []


def test_wait_for_workers_returns_when_enough_connect_and_times_out_otherwise() -> None:
    async def scenario() -> tuple[bool, bool]:
        registry = Registry()
        waiting = asyncio.create_task(registry.wait_for_workers(2, timeout=5))
        for worker_id in ("w0", "w1"):
            await asyncio.sleep(0)
            registry.attach(_hello(worker_id), memory_link_pair(worker_id)[0])
        enough = await waiting
        too_many = await registry.wait_for_workers(3, timeout=0.05)
        return enough, too_many

    assert asyncio.run(scenario()) == (True, False)

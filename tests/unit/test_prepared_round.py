"""One prepared downlink per round: each payload is split into RoundStart messages once and
measured once for all in-memory workers; every worker still ends the round on the master's
reference."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from flq.algorithm import DownlinkSender
from flq.config import default_config, with_overrides
from flq.link import PayloadCache
from flq.master.federation import build_federation, round_config_from
from flq.master.prepared import PreparedRound
from flq.sim import simulate_async
from flq.synthetic import SyntheticEvaluation, SyntheticProblem, SyntheticTrainer
from flq.types import RoundStart

SHAPES = [(40, 3), (3,)]


def _theta(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def test_in_sync_workers_share_the_delta_and_others_the_keyframe() -> None:
    sender = DownlinkSender(b_down=4)
    config = round_config_from(default_config())
    sender.prepare(_theta(0))
    downlink = sender.prepare(_theta(1))
    prepared = PreparedRound(2, downlink, config, lazy_scalar=0.5)
    delta, again = prepared.payload_for(1), prepared.payload_for(1)
    keyframe = prepared.payload_for(-1)
    assert delta is again and delta.kind == "delta"
    assert keyframe is prepared.payload_for(0) and keyframe.kind == "keyframe"
    for payload in (delta, keyframe):
        assert payload.version == prepared.version == 2
        assert all(m.round == 2 and m.download_ref_version == 2 for m in payload.messages)
        assert all(m.lazy_scalar == 0.5 and m.config is config for m in payload.messages)
    assert downlink.delta is not None
    assert delta.bits == sum(e.cost_bits() for e in downlink.delta) == 688  # 4 bits + headers
    assert keyframe.bits == 32 * 123 + 128 == 4064  # float32 + headers


def test_a_worker_that_missed_rounds_gets_its_own_chain_not_the_shared_delta() -> None:
    sender = DownlinkSender(b_down=4)
    config = round_config_from(default_config())
    for seed in range(3):
        sender.prepare(_theta(seed))
    downlink = sender.prepare(_theta(3))
    prepared = PreparedRound(4, downlink, config, lazy_scalar=0.5)
    delta, chain = prepared.payload_for(3), prepared.payload_for(1)
    assert delta.kind == chain.kind == "delta" and delta is not chain
    assert chain is prepared.payload_for(1)
    assert (delta.base_version, chain.base_version) == (3, 1)
    assert chain.bits == 3 * delta.bits  # the deltas to versions 2, 3 and 4, in order
    tensors = [t for m in chain.messages for t in m.tensors]
    assert [t.tensor_count for t in tensors] == [3 * len(SHAPES)] * len(tensors)


def test_a_simulated_round_measures_each_payload_once_for_all_workers(
    tmp_path: Path, round_start_conversions: list[int]
) -> None:
    converted = round_start_conversions
    problem = SyntheticProblem(dim=20, samples_per_worker=32, seed=4)
    cfg = with_overrides(
        default_config(),
        {
            "system.total_workers": 4,
            "system.max_rounds": 3,
            "flq_algorithm.mode": "bbit",
            "flq_algorithm.b_down": 8,  # round 1 a keyframe, later rounds an 8-bit delta
            "lazy_selection.warmup": 0,
        },
    )
    federation = build_federation(cfg, SyntheticEvaluation(problem))
    trainers = [SyntheticTrainer(problem, i) for i in range(4)]
    rows: list[dict[str, Any]] = []
    asyncio.run(
        simulate_async(
            cfg, tmp_path, on_round=rows.append, trainers=trainers, federation=federation
        )
    )
    assert [r["failed"] for r in rows] == [0, 0, 0]
    assert sorted(converted) == [1, 2, 3]  # four workers, one measurement per round


def test_a_transport_converts_the_chain_and_the_shared_delta_apart() -> None:
    """Found by the fault soak: keyed by (kind, version) alone, the gRPC cache served the first
    worker's catch-up chain to every in-sync worker of the round, which refused it."""
    sender = DownlinkSender(b_down=4)
    for seed in range(3):
        sender.prepare(_theta(seed))
    prepared = PreparedRound(4, sender.prepare(_theta(3)), round_config_from(default_config()), 0.5)
    chain, delta = prepared.payload_for(2), prepared.payload_for(3)
    assert (chain.base_version, delta.base_version) == (2, 3)
    cache: PayloadCache[RoundStart] = PayloadCache(lambda message: message)
    assert cache.get(chain) == list(chain.messages)
    assert cache.get(delta) == list(delta.messages) != list(chain.messages)

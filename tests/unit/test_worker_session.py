"""A worker session against a master end driven by hand over an in-memory link: Hello, a round
with a granted upload, a denied round, a reference reset, and the goodbye that ends it."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from flq.algorithm import DownlinkSender
from flq.codec import Reassembler
from flq.config import default_config, with_overrides
from flq.master.federation import round_config_from
from flq.master.prepared import PreparedRound
from flq.memlink import MemoryWorkerLink, memory_link_pair
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.types import (
    PROTOCOL_VERSION,
    Decision,
    Hello,
    ResetReference,
    Shutdown,
    UpdateChunk,
    UploadOffer,
    Welcome,
)
from flq.worker.session import SessionEnd, SessionOptions, WorkerState, run_session

PROBLEM = SyntheticProblem(dim=10, samples_per_worker=16, seed=2)
CONFIG = round_config_from(
    with_overrides(
        default_config(),
        {"flq_algorithm.mode": "bbit", "flq_algorithm.b_down": 32, "lazy_selection.warmup": 100},
    )
)


async def _next(master: MemoryWorkerLink, kind: type) -> Any:
    message = (await asyncio.wait_for(master.recv(), 10)).message
    assert isinstance(message, kind), message
    return message


async def _round(master: MemoryWorkerLink, sender: DownlinkSender, round_id: int) -> UploadOffer:
    prepared = PreparedRound(round_id, sender.prepare(PROBLEM.initial_weights()), CONFIG, 0.0)
    await master.send_payload(prepared.payload_for(sender.version - 1))
    offer: UploadOffer = await _next(master, UploadOffer)
    assert offer.round == round_id
    return offer


def test_a_session_offers_uploads_when_granted_keeps_its_reference_when_denied() -> None:
    state = WorkerState("w0")
    trainer = SyntheticTrainer(PROBLEM, 0)
    shapes = [w.shape for w in PROBLEM.initial_weights()]

    async def scenario() -> Any:
        master, worker = memory_link_pair("w0")
        options = SessionOptions(heartbeat_interval_s=math.inf)
        session = asyncio.create_task(run_session(state, trainer, worker, options))
        hello: Hello = await _next(master, Hello)
        assert (hello.worker_id, hello.protocol_version, hello.upload_ref_version) == (
            "w0",
            PROTOCOL_VERSION,
            0,
        )
        await master.send(Welcome("w0", PROTOCOL_VERSION, "s1", 1, False, 0, 0))
        sender = DownlinkSender(b_down=32)

        offer = await _round(master, sender, 1)
        assert offer.wants_upload and offer.forced and offer.cost_bits > 0  # warm-up
        await master.send(Decision(1, True, "granted", upload_ref_version=1))
        reassembler = Reassembler(expected_shapes=shapes)
        while not reassembler.complete:
            chunk: UpdateChunk = await _next(master, UpdateChunk)
            assert (chunk.round, chunk.upload_ref_version) == (1, 0)  # against what we hold
            for tensor in chunk.tensors:
                reassembler.add(tensor)
        uploaded = reassembler.finish()
        assert sum(e.cost_bits() for e in uploaded) == offer.cost_bits

        await _round(master, sender, 2)
        await master.send(Decision(2, False, "budget", upload_ref_version=1))
        await _round(master, sender, 3)  # no upload came in between: the next is an offer
        version_before_reset = state.upload_version
        await master.send(ResetReference(3, "test", upload_ref_version=0, download_ref_version=3))
        await master.send(Shutdown(3, "test over", reconnect=False))
        outcome = await asyncio.wait_for(session, 10)
        return uploaded, version_before_reset, outcome

    uploaded, version_before_reset, outcome = asyncio.run(scenario())
    assert version_before_reset == 1  # granted once, denied once: one commit
    assert state.upload_version == 0  # the reset
    assert outcome.end is SessionEnd.SHUTDOWN
    assert all(np.isfinite(e.scales).all() for e in uploaded)

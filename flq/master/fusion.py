"""The round engine's fusion step: after the server step, let a fuser (flq/learning/fusion.py)
propose new global weights, check them, and apply them — or skip, saying why.

A fusion never ends the round and never lets a non-finite or misshapen model in: any error the
fuser raises, a non-finite loss, or weights of other shapes or with a NaN or infinity skip the
fusion for that round (`skipped:<reason>` in rounds.csv's `fusion` column) and leave the model
as the server step left it. Applied weights reach the workers with the next round's model,
quantized against their downlink reference like any global update, and their bits are counted
in that round's `downlink_bits`. The fuser runs in a thread: heartbeats and keepalives keep
their time while it trains.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

log = structlog.get_logger("flq.master")
APPLIED = "applied"
REASON_CHARS = 120  # a skip reason stays one short CSV cell


class FusedLike(Protocol):
    """A fuser's proposal: new global weights and the server-side loss of its steps."""

    @property
    def weights(self) -> list[np.ndarray]: ...

    @property
    def loss(self) -> float: ...


class Fuser(Protocol):
    """Proposes fused global weights (flq.learning.fusion: Distiller, ParamAttention)."""

    def fuse(self, weights: list[np.ndarray]) -> FusedLike: ...


@dataclass(frozen=True)
class FusionSchedule:
    """Fuse after round `start_round` and every `every`-th round after it."""

    start_round: int = 2
    every: int = 1

    def due(self, round_id: int) -> bool:
        return round_id >= self.start_round and (round_id - self.start_round) % self.every == 0


@dataclass(frozen=True)
class FusionRecord:
    """What the fusion step did in one round: `status` is "" (not due), "applied" or
    "skipped:<reason>"; `loss` the fuser's server-side loss; `seconds` its wall time."""

    status: str = ""
    loss: float = math.nan
    seconds: float = 0.0


class FusionStep:
    def __init__(self, fuser: Fuser, schedule: FusionSchedule, method: str) -> None:
        self.fuser = fuser
        self.schedule = schedule
        self.method = method

    async def run(
        self, weights: Sequence[np.ndarray], round_id: int
    ) -> tuple[FusionRecord, list[np.ndarray] | None]:
        """(what happened, the fused weights to apply or None). `weights` is not changed."""
        if not self.schedule.due(round_id):
            return FusionRecord(), None
        began = time.perf_counter()
        try:
            fused = await asyncio.to_thread(self.fuser.fuse, [w.copy() for w in weights])
            problem = fused_problem(weights, fused.weights, fused.loss)
        except Exception as error:  # any fuser failure skips this round's fusion, never the round
            log.warning("fusion failed: skipped this round", method=self.method, exc_info=True)
            problem = f"error: {type(error).__name__}: {error}"
            fused = None
        seconds = time.perf_counter() - began
        loss = math.nan if fused is None else float(fused.loss)
        if problem is not None:
            reason = " ".join(problem.split())[:REASON_CHARS]
            log.warning("fusion skipped", method=self.method, reason=reason)
            return FusionRecord(f"skipped:{reason}", loss, seconds), None
        assert fused is not None
        log.info("fusion applied", method=self.method, loss=loss, seconds=round(seconds, 3))
        return FusionRecord(APPLIED, loss, seconds), [
            np.asarray(w, np.float32) for w in fused.weights
        ]


def fused_problem(
    before: Sequence[np.ndarray], after: Sequence[np.ndarray], loss: float
) -> str | None:
    """Why fused weights must not be applied, or None: a non-finite loss, another number of
    tensors or other shapes, a NaN or infinity anywhere."""
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if len(after) != len(before):
        return f"{len(after)} tensors, the model has {len(before)}"
    for position, (old, new) in enumerate(zip(before, after, strict=True)):
        if np.shape(new) != old.shape:
            return f"tensor {position} has shape {np.shape(new)}, the model's is {old.shape}"
        if not np.isfinite(new).all():
            return f"non-finite weights in tensor {position}"
    return None

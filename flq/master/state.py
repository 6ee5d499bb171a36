"""The master's algorithm state: global weights, stored contributions, server optimizer, downlink
reference, the lazy scalar, and the round counter — and its checkpoint form."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flq.algorithm import (
    AggregateOptions,
    ContributionStore,
    DownlinkSender,
    aggregate,
    make_server_optimizer,
    make_weighting,
    parse_mode,
)
from flq.codec import EncodedTensor
from flq.config import Config


@dataclass(frozen=True)
class AlgorithmSettings:
    mode: str = "bbit"
    b_up: int = 4
    bbit_block: int = 0
    b_down: int = 32
    server_optimizer: str = "avg"
    server_lr: float = 1.0
    weighting: str = "samples"
    aggregate: AggregateOptions = field(default_factory=AggregateOptions)


def algorithm_settings_from(cfg: Config) -> AlgorithmSettings:
    algo = cfg.flq_algorithm
    return AlgorithmSettings(
        mode=algo.mode,
        b_up=algo.b_up,
        bbit_block=algo.bbit_block,
        b_down=algo.b_down,
        server_optimizer=algo.server_optimizer,
        server_lr=algo.server_lr,
        weighting=algo.weighting,
        aggregate=AggregateOptions(
            clip_global=algo.clip_global,
            scale_by_selected=algo.scale_by_selected,
            sel_ref=algo.sel_ref,
        ),
    )


@dataclass(frozen=True)
class StepResult:
    weights: dict[str, float]
    source: str


@dataclass(frozen=True)
class WeightDecision:
    """A round's aggregation weights decided outside the step (an LLM advisor, flq/master/llm.py).

    `weights` are raw and non-negative; the aggregate keeps only contributors and normalises.
    `source` is "llm", "cache" or "fallback:<reason>"."""

    weights: Mapping[str, float]
    source: str
    confidence: float = math.nan
    reasoning: str = ""


class _Decided:
    """A WeightDecision as the aggregate's Weighting."""

    def __init__(self, decision: WeightDecision) -> None:
        self.name = decision.source
        self._weights = decision.weights

    def weights(self, worker_ids: Sequence[str], samples: Mapping[str, int]) -> dict[str, float]:
        return {w: float(self._weights.get(w, 0.0)) for w in worker_ids}


class MasterState:
    def __init__(self, weights: Sequence[np.ndarray], settings: AlgorithmSettings) -> None:
        self.settings = settings
        self.weights = [np.array(w, dtype=np.float32) for w in weights]
        self.round = 1  # the next round to run
        self.lazy_scalar = 0.0  # h, broadcast with the next round
        shapes = [tuple(w.shape) for w in self.weights]
        self.store = ContributionStore(
            shapes, parse_mode(settings.mode), settings.b_up, settings.bbit_block
        )
        self.optimizer = make_server_optimizer(settings.server_optimizer, settings.server_lr)
        self.downlink = DownlinkSender(settings.b_down)
        # "llm" decides per round (WeightDecision); without a decision its rule is sample counts.
        self.weighting = make_weighting(
            "samples" if settings.weighting == "llm" else settings.weighting
        )

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(w.shape) for w in self.weights]

    def check_upload_codec(self, encoded: Sequence[EncodedTensor]) -> None:
        """ValueError unless the upload is what this mode sends for this model."""
        self.store.check(encoded)

    def step(
        self,
        samples: Mapping[str, int],
        fresh: set[str],
        decision: WeightDecision | None = None,
    ) -> StepResult:
        """Aggregate every stored contribution (fresh and stale) and move the global model, with
        the decided weights when there is a decision, else by the configured rule."""
        weighting = self.weighting if decision is None else _Decided(decision)
        result = aggregate(self.store, weighting, samples, fresh, self.settings.aggregate)
        self.store.record_weights(result.weights)
        self.lazy_scalar = result.lazy_scalar
        if result.contributors:
            self.weights = self.optimizer.step(self.weights, result.delta)
        return StepResult(result.weights, weighting.name)

    # ------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "lazy_scalar": self.lazy_scalar,
            "mode": self.settings.mode,
            "weights": [w.copy() for w in self.weights],
            "store": self.store.state(),
            "optimizer": self.optimizer.state(),
            "downlink": self.downlink.state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state["mode"] != self.settings.mode:
            raise ValueError(
                f"checkpoint is for mode {state['mode']!r}, config says "
                f"{self.settings.mode!r}: resume with the config it was run with"
            )
        weights = [np.array(w, dtype=np.float32) for w in state["weights"]]
        if [w.shape for w in weights] != [w.shape for w in self.weights]:
            raise ValueError("checkpoint model shapes differ from the configured model")
        self.weights = weights
        self.round = int(state["round"])
        self.lazy_scalar = float(state["lazy_scalar"])
        self.store.load_state(state["store"])
        self.optimizer.load_state(state.get("optimizer", {}))
        self.downlink.load_state(state["downlink"])

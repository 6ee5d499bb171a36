"""The master's algorithm state: global weights, stored contributions, server optimizer, downlink
reference, the lazy scalar, and the round counter — and its checkpoint form.

Nothing non-finite gets in: uploads are screened as they are applied (`apply_uploads`), and a step
is proposed, checked and only then committed (`step`). A proposal with a NaN or infinity drops the
contribution that weighs most in it (weight x norm), resets that worker and tries again, so the
global model, the optimizer state and every checkpoint stay finite whatever the workers send."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from flq.algorithm import (
    AggregateOptions,
    ContributionStore,
    DownlinkSender,
    ScreenOptions,
    aggregate,
    make_server_optimizer,
    make_weighting,
    parse_mode,
)
from flq.algorithm._arrays import check_finite
from flq.codec import EncodedTensor
from flq.config import Config

log = structlog.get_logger("flq.master")
NON_FINITE_STEP = "non-finite step"
ADVISED_WEIGHTINGS = ("llm", "agreement")  # weights come from an advisor (flq/master/advice.py)


@dataclass(frozen=True)
class AlgorithmSettings:
    mode: str = "bbit"
    b_up: int = 4
    bbit_block: int = 0
    density: float = 0.01
    b_down: int = 32
    down_density: float = 0.0
    gap_code: str = "best"
    sparse_scope: str = "tensor"
    server_optimizer: str = "avg"
    server_lr: float = 1.0
    weighting: str = "samples"
    aggregate: AggregateOptions = field(default_factory=AggregateOptions)
    screen: ScreenOptions = field(default_factory=ScreenOptions)
    max_absent: int | None = None  # rounds a gone worker's contribution keeps counting


def algorithm_settings_from(cfg: Config) -> AlgorithmSettings:
    algo, agg = cfg.flq_algorithm, cfg.aggregation
    return AlgorithmSettings(
        mode=algo.mode,
        b_up=algo.b_up,
        bbit_block=algo.bbit_block,
        density=algo.density,
        b_down=algo.b_down,
        down_density=algo.down_density,
        gap_code=algo.gap_code,
        sparse_scope=algo.sparse_scope,
        server_optimizer=algo.server_optimizer,
        server_lr=algo.server_lr,
        weighting=algo.weighting,
        aggregate=AggregateOptions(
            clip_global=algo.clip_global,
            scale_by_selected=algo.scale_by_selected,
            sel_ref=algo.sel_ref,
            rule=agg.rule,
            trim=agg.trim,
            clip_factor=agg.clip_factor,
        ),
        screen=ScreenOptions(factor=agg.screen_factor),
        max_absent=agg.max_absent_rounds,
    )


@dataclass(frozen=True)
class StepResult:
    weights: dict[str, float]
    source: str
    refused: dict[str, str] = field(default_factory=dict)  # worker -> why its Q_i was dropped


@dataclass(frozen=True)
class WeightDecision:
    """A round's aggregation weights decided outside the step (an LLM advisor, flq/master/llm.py).

    `weights` are raw and non-negative; the aggregate keeps only contributors and normalises.
    `source` is "llm", "cache", "agreement" or "fallback:<reason>"."""

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
            shapes,
            parse_mode(settings.mode),
            settings.b_up,
            settings.bbit_block,
            density=settings.density,
            gap_classes=settings.gap_code != "golomb",
            per_tensor=settings.sparse_scope == "tensor",
            max_absent=settings.max_absent,
        )
        self.optimizer = make_server_optimizer(settings.server_optimizer, settings.server_lr)
        self.downlink = DownlinkSender(
            settings.b_down,
            settings.down_density,
            settings.gap_code != "golomb",
            per_tensor=settings.sparse_scope == "tensor",
        )
        # An advisor's weighting ("llm", "agreement") decides per round (WeightDecision);
        # without a decision its rule is sample counts.
        advised = settings.weighting in ADVISED_WEIGHTINGS
        self.weighting = make_weighting("samples" if advised else settings.weighting)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(w.shape) for w in self.weights]

    def check_upload_codec(self, encoded: Sequence[EncodedTensor]) -> None:
        """ValueError unless the upload is what this mode sends for this model."""
        self.store.check(encoded)

    def apply_uploads(self, uploads: Mapping[str, Sequence[EncodedTensor]]) -> dict[str, str]:
        """Store this round's uploads; returns the refused ones (reset in the store) and why."""
        refused = self.store.apply_uploads(uploads, self.settings.screen)
        for worker_id, reason in sorted(refused.items()):
            log.warning("upload refused: reference reset", worker=worker_id, reason=reason)
        return refused

    def step(
        self,
        samples: Mapping[str, int],
        fresh: set[str],
        decision: WeightDecision | None = None,
    ) -> StepResult:
        """Aggregate every counting contribution (fresh and stale) and move the global model, with
        the decided weights when there is a decision, else by the configured rule. A step that
        would not be finite is never taken (see the module docstring)."""
        weighting = self.weighting if decision is None else _Decided(decision)
        refused: dict[str, str] = {}
        while True:
            result = aggregate(self.store, weighting, samples, fresh, self.settings.aggregate)
            if not result.contributors:
                proposal = None
                break
            proposal = self.optimizer.propose(self.weights, result.delta)
            if proposal.finite() and math.isfinite(result.lazy_scalar):
                break
            culprit = max(result.weights, key=lambda w: result.weights[w] * self.store.norm(w))
            log.error(
                "step would not be finite: contribution dropped, reference reset",
                worker=culprit,
                norm=self.store.norm(culprit),
                weight=result.weights[culprit],
            )
            refused[culprit] = NON_FINITE_STEP
            self.store.reset(culprit)
        self.store.record_weights(result.weights)
        self.lazy_scalar = result.lazy_scalar
        if proposal is not None:
            self.weights = self.optimizer.commit(proposal)
        return StepResult(result.weights, weighting.name, refused)

    def apply_fused(self, weights: Sequence[np.ndarray]) -> None:
        """Replace the global model with fused weights (flq.master.fusion checked them; this
        checks again, since nothing non-finite or misshapen may ever become the model)."""
        fused = [np.array(w, dtype=np.float32) for w in weights]
        if [w.shape for w in fused] != [w.shape for w in self.weights]:
            raise ValueError("fused weights have other shapes than the global model")
        check_finite(fused, "fused global model")
        self.weights = fused

    # ------------------------------------------------------------ checkpoint

    def snapshot(self) -> dict[str, Any]:
        """Everything a checkpoint needs to resume this state (copies, safe to write later)."""
        return {
            "round": self.round,
            "lazy_scalar": self.lazy_scalar,
            "mode": self.settings.mode,
            "weights": [w.copy() for w in self.weights],
            "store": self.store.state(),
            "optimizer": self.optimizer.state(),
            "downlink": self.downlink.state(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from a `snapshot()`; refuses one of another mode or model shape."""
        if state["mode"] != self.settings.mode:
            raise ValueError(
                f"checkpoint is for mode {state['mode']!r}, config says "
                f"{self.settings.mode!r}: resume with the config it was run with"
            )
        weights = [np.array(w, dtype=np.float32) for w in state["weights"]]
        if [w.shape for w in weights] != [w.shape for w in self.weights]:
            raise ValueError("checkpoint model shapes differ from the configured model")
        check_finite(weights, "checkpoint global model")
        self.weights = weights
        self.round = int(state["round"])
        self.lazy_scalar = float(state["lazy_scalar"])
        self.store.load_state(state["store"])
        self.optimizer.load_state(state.get("optimizer", {}))
        self.downlink.load_state(state["downlink"])

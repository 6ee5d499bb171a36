"""Everything the master builds from a Config: state, engine, registry, evaluation, result rows.

The daemon and `flq simulate` both start here, so a simulation is the same federation minus the
sockets. Building it loads the test split and the initial model, which imports TensorFlow (the
master evaluates the global model); that happens in a thread, after the server can already say
it is starting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import structlog

from flq.algorithm.reference import upload_cost_bits
from flq.config import Config, config_warnings
from flq.master.advice import AgreementAdvisor, WeightAdvisor
from flq.master.checkpoint import write_model_npz
from flq.master.engine import EngineSettings, RoundEngine
from flq.master.fusion import FusionSchedule, FusionStep
from flq.master.llm import LlmAdvisor
from flq.master.registry import Registry
from flq.master.state import MasterState, algorithm_settings_from
from flq.synthetic import SyntheticEvaluation, problem_for
from flq.types import ModelInfo, RoundConfig

log = structlog.get_logger("flq.master")
MODEL_NPZ: Final = "model.npz"  # the final model, in the results directory
MODEL_KERAS: Final = "model.keras"

log = structlog.get_logger("flq.master")


def round_config_from(cfg: Config) -> RoundConfig:
    """What the master dictates to every worker each round."""
    algo, lazy, model = cfg.flq_algorithm, cfg.lazy_selection, cfg.model
    return RoundConfig(
        mode=algo.mode,
        b_up=algo.b_up,
        b_down=algo.b_down,
        local_steps=model.local_steps,
        local_epochs=model.local_epochs,
        batch_size=cfg.dataset.batch_size,
        lr=model.lr,
        l2=model.l2,
        prox_mu=model.prox_mu,
        thr_scale=lazy.thr_scale,
        lazy_d=lazy.D,
        lazy_ck=lazy.ck,
        lazy_c=lazy.C,
        warmup=lazy.warmup,
        stochastic_rounding=algo.stochastic_rounding,
        bbit_block=algo.bbit_block,
        density=algo.density,
        gap_code=algo.gap_code,
        sparse_scope=algo.sparse_scope,
        error_feedback=algo.error_feedback,
        deadline_ms=int(cfg.system.round_timeout_s * 1000),
        optimizer=model.optimizer,
    )


def engine_settings_from(cfg: Config) -> EngineSettings:
    return EngineSettings(
        round_config=round_config_from(cfg),
        sel_clients=cfg.budget_selection.sel_clients,
        up_budget_bits=cfg.budget_selection.up_budget_bits,
        by_sample_share=cfg.budget_selection.by_sample_share,
        round_timeout_s=cfg.system.round_timeout_s,
        offer_quorum=cfg.system.offer_quorum,
        offer_grace_s=cfg.system.offer_grace_s,
        participation=cfg.system.participation,
        seed=cfg.system.seed,
        max_rounds=cfg.system.max_rounds,
        lr_decay_every=cfg.model.lr_decay_every,
        lr_decay_factor=cfg.model.lr_decay_factor,
    )


class ModelEvaluation(Protocol):
    """Where the initial model comes from and how the global model is scored."""

    initial_weights: list[np.ndarray]
    parameters: int

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]: ...


class Evaluation:
    """The master's test split and a model to score the global weights on (TensorFlow)."""

    def __init__(self, cfg: Config) -> None:
        from flq.learning.architecture import architecture_of
        from flq.learning.lora import LoraSpec, apply_lora, get_exchanged, merge_layout
        from flq.learning.models import ModelRecipe, count_parameters
        from flq.learning.sources import data_source, master_data
        from flq.learning.trainer import Evaluator

        spec, test = master_data(
            data_source(cfg.dataset, cfg.system.seed),
            cfg.dataset,
            num_workers=cfg.system.total_workers,
        )
        recipe = ModelRecipe.from_config(cfg)
        model = recipe.build(spec.input_shape, spec.num_classes)  # from model.weights if set
        self.architecture = architecture_of(model)  # what every worker's Hello must match
        self.parameters = count_parameters(model)  # the model itself, without LoRA adapters
        lora = LoraSpec.from_config(cfg)
        # With LoRA the federation's weights are the adapters only (flq/learning/lora.py).
        self.lora_layers = apply_lora(model, lora, seed=cfg.system.seed)
        self.initial_weights: list[np.ndarray] = get_exchanged(model)
        self._merge = merge_layout(model) if lora.enabled else None
        self.spec = spec  # input shape and classes: what `flq model pull` rebuilds a model from
        self.evaluator = Evaluator(
            recipe,  # with LoRA the frozen base comes from model.weights here too
            spec,
            test,
            seed=cfg.system.seed,
            lora=lora,
        )
        self._plain = replace(recipe, weights="")  # the served model's architecture

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        loss, accuracy = self.evaluator.evaluate(weights)
        return float(loss), float(accuracy)

    def model_weights(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The plain model's weights: with LoRA, the frozen base with the adapters merged in."""
        return weights if self._merge is None else self._merge.merged(weights)

    def write_keras(self, model_weights: list[np.ndarray], path: Path) -> None:
        """The plain model (no adapters) with these weights, as a .keras file."""
        from flq.learning.weights import write_keras

        spec = self.spec
        model = self._plain.build(spec.input_shape, spec.num_classes)
        write_keras(model, model_weights, path)


@dataclass
class Federation:
    cfg: Config
    state: MasterState
    registry: Registry
    engine: RoundEngine
    evaluation: ModelEvaluation

    @property
    def parameters(self) -> int:
        return self.evaluation.parameters

    def should_evaluate(self, round_id: int) -> bool:
        every = self.cfg.system.eval_every
        return every > 0 and (round_id % every == 0 or round_id >= self.cfg.system.max_rounds)

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        return self.evaluation.evaluate(weights)

    def size_summary(self, uplink_bits: int) -> dict[str, Any]:
        """What exists vs what travels: the served model's parameters (`total_parameters`: with
        LoRA the base, adapters merged in; what full-model federation exchanges), the exchanged
        ones (with LoRA: the adapters), the uplink bytes per upload measured (one client, one
        round), and what one upload of the whole model costs with the same codec (with LoRA,
        encoded once here: exact for every codec but stc/sti, whose sizes depend on the values)."""
        exchanged = sum(int(w.size) for w in self.state.weights)
        uploads = sum(r.uploads for r in self.registry.all())
        per_upload = uplink_bits / 8 / uploads if uploads else 0.0
        lora = self.cfg.lora.rank > 0
        full_model = self._full_model_upload_bytes() if lora else per_upload
        return {
            "total_parameters": self.parameters,
            "exchanged_parameters": exchanged,
            "lora_rank": self.cfg.lora.rank,
            "uplink_bytes_per_upload": round(per_upload, 1),
            "full_model_uplink_bytes_per_upload": round(full_model, 1),
            "float32_full_model_bytes": 4 * self.parameters,
        }

    def _full_model_upload_bytes(self) -> float:
        shapes = [tuple(w.shape) for w in self.model_weights()]
        return upload_cost_bits(shapes, round_config_from(self.cfg)) / 8

    def model_info(self) -> ModelInfo:
        """The global model's architecture as Status reports it and model files record it."""
        spec = getattr(self.evaluation, "spec", None)
        return ModelInfo(
            name=self.cfg.model.label,
            dataset=self.cfg.dataset.label,
            hidden_units=self.cfg.model.hidden_units,
            input_shape=() if spec is None else tuple(spec.input_shape),
            num_classes=0 if spec is None else spec.num_classes,
            parameters=self.parameters,
        )

    def write_model(self, run_dir: Path) -> list[Path]:
        """The final model in `run_dir`: model.npz always (numpy), model.keras where the model
        is a Keras one; with LoRA the base with the adapters folded in. Returns the files."""
        weights = [np.asarray(w, dtype=np.float32) for w in self.model_weights()]
        written = [run_dir / MODEL_NPZ]
        mode, last_round = self.cfg.flq_algorithm.mode, self.state.round - 1
        write_model_npz(written[0], weights, self.model_info(), mode, last_round)
        write_keras = getattr(self.evaluation, "write_keras", None)
        if write_keras is not None:
            write_keras(weights, run_dir / MODEL_KERAS)
            written.append(run_dir / MODEL_KERAS)
        return written

    def model_weights(self) -> list[np.ndarray]:
        """The global model as a plain model (what GetGlobalModel serves): the federation's
        weights, or with LoRA the base with the adapters merged in."""
        merge = getattr(self.evaluation, "model_weights", None)
        return self.state.weights if merge is None else list(merge(self.state.weights))

    def advisor_summary(self) -> dict[str, Any] | None:
        """What the weight advisor did (for summary.json), if it keeps such an account."""
        summary = getattr(self.engine.advisor, "summary", None)
        return None if summary is None else dict(summary())

    async def aclose(self) -> None:
        """Release what the federation holds beyond memory (the LLM advisor's connections)."""
        close = getattr(self.engine.advisor, "aclose", None)
        if close is not None:
            await close()


def build_federation(cfg: Config, evaluation: ModelEvaluation | None = None) -> Federation:
    """The federation for `cfg`; `evaluation` replaces the TensorFlow model (tests, benches)."""
    if cfg.lora.rank > 0 and cfg.dataset.name == "synthetic":
        raise ValueError("lora.rank > 0 needs a Keras model; dataset synthetic has none")
    for warning in config_warnings(cfg):
        log.warning("config", warning=warning)
    if evaluation is None:
        if cfg.fusion.method != "none":
            _apply_master_device_caps(cfg)  # before TensorFlow's runtime starts
        evaluation = (
            SyntheticEvaluation(problem_for(cfg))
            if cfg.dataset.name == "synthetic"
            else Evaluation(cfg)
        )
    state = MasterState(evaluation.initial_weights, algorithm_settings_from(cfg))
    registry = Registry()
    fusion = build_fusion(cfg, evaluation.initial_weights)
    # Workers whose model differs from this one are refused at their Hello.
    settings = replace(engine_settings_from(cfg), model=getattr(evaluation, "architecture", None))
    engine = RoundEngine(state, registry, settings, advisor_for(cfg), fusion)
    return Federation(cfg, state, registry, engine, evaluation)


def advisor_for(cfg: Config) -> WeightAdvisor | None:
    """Who proposes each round's weights: an LLM, the agreement rule, or nobody (the rule in
    MasterState decides)."""
    weighting = cfg.flq_algorithm.weighting
    if weighting == "llm":
        return LlmAdvisor.from_config(cfg.llm)
    if weighting == "agreement":
        return AgreementAdvisor()
    return None


def build_fusion(cfg: Config, initial_weights: list[np.ndarray]) -> FusionStep | None:
    """The fusion step of [fusion] (None for method none): the teacher loaded once, the master's
    held-out share of the training set as its data. FusionSetupError (exit 2) when the teacher
    file is missing or unreadable, or does not fit the dataset or the model."""
    fusion = cfg.fusion
    if fusion.method == "none":
        return None
    from flq.learning.data import load_dataset
    from flq.learning.fusion import FusionSettings, build_fuser
    from flq.learning.partition import split_server_share

    data = cfg.dataset
    spec, train, _ = load_dataset(
        data.name, data.data_dir, test_fraction=data.test_fraction, seed=cfg.system.seed
    )
    server, _ = split_server_share(train, fusion.server_share, cfg.system.seed)
    settings = FusionSettings(
        method=fusion.method,
        teacher=fusion.teacher,
        model_name=cfg.model.name,
        hidden_units=cfg.model.hidden_units,
        steps=fusion.steps,
        batch_size=fusion.batch_size,
        lr=fusion.lr,
        temperature=fusion.temperature,
        label_weight=fusion.label_weight,
        student_layers=tuple(n.strip() for n in fusion.student_layers.split(",")),
        attention_dim=fusion.attention_dim,
        attention_heads=fusion.attention_heads,
        attention_blocks=fusion.attention_blocks,
        seed=cfg.system.seed,
    )
    fuser = build_fuser(settings, spec, server, initial_weights)
    log.info(
        "fusion ready",
        method=fusion.method,
        teacher=fusion.teacher,
        server_samples=len(server),
        start_round=fusion.start_round,
        every=fusion.every,
    )
    return FusionStep(fuser, FusionSchedule(fusion.start_round, fusion.every), fusion.method)


def _apply_master_device_caps(cfg: Config) -> None:
    """The teacher makes the master a heavy TensorFlow user: the config's GPU memory caps apply
    to it as to a worker (mixed precision does not: the master's models compute in float32)."""
    from flq.learning.device import apply_device_caps

    caps = cfg.jetson_optimization
    apply_device_caps(
        gpu_memory_limit_mb=caps.gpu_memory_limit_mb,
        memory_growth=caps.memory_growth,
        mixed_precision=False,
    )

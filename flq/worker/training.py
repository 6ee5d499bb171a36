"""Build a worker's trainer from the config: device caps first, then its own data partition.

This is the worker's only door to TensorFlow (through flq.learning), imported lazily by the daemon
and the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flq.config import Config
from flq.learning.lora import LoraSpec
from flq.learning.models import ModelRecipe
from flq.learning.trainer import LocalTrainer
from flq.types import ModelIdentity, TrainResult, TrainSpec


@dataclass
class PartitionTrainer:
    """A LocalTrainer plus the sample count the master weighs this worker by."""

    trainer: LocalTrainer
    num_samples: int

    @property
    def architecture(self) -> ModelIdentity:
        return self.trainer.architecture

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> TrainResult:
        return self.trainer.train(weights, spec)


def build_trainer(
    cfg: Config, worker_id: str, partition_index: int | None = None, keep_data_cache: bool = True
) -> tuple[PartitionTrainer, str]:
    """The trainer for `worker_id` and a short description of the accelerator it runs on.

    The loader keeps every decoded dataset file for the process's lifetime, which the simulator
    (20 trainers over one training set) wants. A worker daemon holds one partition, a copy, so it
    passes keep_data_cache=False: dropping the full decoded set (188 MB of float32 for
    Fashion-MNIST) is what keeps a CNN worker under 1 GB (docs/benchmarks.md, worker memory).
    """
    if cfg.dataset.name == "synthetic":
        if cfg.lora.rank > 0:
            raise ValueError("lora.rank > 0 needs a Keras model; dataset synthetic has none")
        return _synthetic_trainer(cfg, worker_id, partition_index), "cpu (synthetic)"
    from flq.learning.device import apply_device_caps
    from flq.learning.partition import worker_index
    from flq.learning.sources import data_source, worker_data

    caps = cfg.jetson_optimization
    report = apply_device_caps(
        gpu_memory_limit_mb=caps.gpu_memory_limit_mb,
        memory_growth=caps.memory_growth,
        mixed_precision=caps.enable_mixed_precision,
    )
    index = (
        worker_index(worker_id, cfg.system.total_workers)
        if partition_index is None
        else partition_index
    )
    spec, part = worker_data(
        data_source(cfg.dataset, cfg.system.seed),
        cfg.dataset,
        index=index,
        num_workers=cfg.system.total_workers,
        seed=cfg.system.seed,
        server_share=cfg.fusion.server_share,
    )
    trainer = LocalTrainer(
        ModelRecipe.from_config(cfg, for_worker=True),
        spec,
        part,
        seed=cfg.system.seed + index,
        prefetch_size=caps.prefetch_size,
        num_parallel_calls=caps.num_parallel_calls,
        # The model every node builds: with LoRA its frozen base must match the master's.
        model_seed=cfg.system.seed,
        lora=LoraSpec.from_config(cfg),
    )
    if not keep_data_cache:
        from flq.learning.data import clear_cache

        clear_cache()
    accelerator = f"gpu x{report.gpus}" if report.gpus else "cpu"
    return PartitionTrainer(trainer, len(part.y)), accelerator


def _synthetic_trainer(cfg: Config, worker_id: str, partition_index: int | None) -> Any:
    from flq.learning.partition import worker_index
    from flq.synthetic import SyntheticTrainer, problem_for

    index = (
        worker_index(worker_id, cfg.system.total_workers)
        if partition_index is None
        else partition_index
    )
    return SyntheticTrainer(problem_for(cfg), index, delay_s=cfg.dataset.synthetic_train_s)

"""Checks on the final model a master leaves in its results directory (model.keras, model.npz):
both files are a plain model, readable without FLQ's LoRA code, that scores what the run's last
row says on the master's test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flq.config import Config
from flq.learning.data import load_dataset
from flq.learning.models import build_model
from flq.learning.trainer import Evaluator
from flq.learning.weights import load_weights_file
from flq.master.checkpoint import load_checkpoint


def assert_final_model_scores(run_dir: Path, cfg: Config, last_accuracy: str | float) -> None:
    from flq.learning.tfimport import keras

    data = cfg.dataset
    spec, _, test = load_dataset(
        data.name, data.data_dir, test_fraction=data.test_fraction, seed=cfg.system.seed
    )
    accuracy = float(last_accuracy)
    # model.keras on its own: Keras loads it without FLQ and it predicts the run's accuracy.
    served = keras().models.load_model(run_dir / "model.keras", compile=False)
    predicted = np.argmax(served.predict(test.x, verbose=0), axis=-1)
    assert np.mean(predicted == test.y) == pytest.approx(accuracy, abs=1e-6)
    # model.npz: the same weights, as FLQ's loader (lora.base) reads them into a plain model.
    plain = build_model(
        cfg.model.name, spec.input_shape, spec.num_classes, hidden_units=cfg.model.hidden_units
    )
    load_weights_file(plain, run_dir / "model.npz")
    for ours, keras_file in zip(plain.get_weights(), served.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, keras_file)
    evaluator = Evaluator(cfg.model.name, spec, test, hidden_units=cfg.model.hidden_units)
    assert evaluator.evaluate(plain.get_weights())[1] == pytest.approx(accuracy, abs=1e-6)
    saved = load_checkpoint(run_dir / "model.npz")
    assert saved["name"] == cfg.model.name and saved["input_shape"] == list(spec.input_shape)

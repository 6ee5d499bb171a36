"""TensorFlow side of flq.learning: models, local training, evaluation, device caps.

One digits dataset and one trainer are shared per module (TF import and model building dominate
the cost). Gradients used as references are computed here with a fresh GradientTape on a fresh
model, independently of the trainer's compiled step.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from structlog.testing import capture_logs

from flq.learning.data import ArrayData, DatasetSpec
from flq.learning.device import apply_device_caps, quiet_tensorflow_env
from flq.learning.models import build_model, count_parameters
from flq.learning.tfimport import keras, tf
from flq.learning.trainer import Evaluator, LocalTrainer, Weights
from flq.types import TrainSpec

SMALL_PARTITION = 40


@pytest.fixture(scope="module")
def small(digits: tuple[DatasetSpec, ArrayData, ArrayData]) -> ArrayData:
    """A partition small enough to be one whole batch, so the batch a step used is known."""
    return digits[1].subset(np.arange(SMALL_PARTITION))


@pytest.fixture(scope="module")
def logreg_trainer(
    digits: tuple[DatasetSpec, ArrayData, ArrayData], small: ArrayData
) -> LocalTrainer:
    return LocalTrainer("logreg", digits[0], small, seed=7)


@pytest.fixture(scope="module")
def mlp_trainer(digits: tuple[DatasetSpec, ArrayData, ArrayData]) -> LocalTrainer:
    return LocalTrainer("mlp", digits[0], digits[1], hidden_units=32, seed=1)


def _gradient(model_name: str, weights: Weights, data: ArrayData, spec: DatasetSpec) -> Weights:
    """Gradient of the mean cross-entropy, -mean(log p[y]), on all of `data`."""
    tf_ = tf()
    model = build_model(model_name, spec.input_shape, spec.num_classes)
    model.set_weights(weights)
    with tf_.GradientTape() as tape:
        probs = model(tf_.constant(data.x), training=True)
        picked = tf_.gather(probs, tf_.constant(data.y), axis=1, batch_dims=1)
        loss = -tf_.reduce_mean(tf_.math.log(picked))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def _perturbed(weights: Weights, seed: int) -> Weights:
    # Non-zero biases, so a sign or ordering mix-up cannot hide behind zeros.
    rng = np.random.default_rng(seed)
    return [(w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32) for w in weights]


# --- models --------------------------------------------------------------------------------------


def test_cnn_has_the_reference_parameter_count() -> None:
    model = build_model("cnn", (28, 28, 1), 10)
    assert count_parameters(model) == 467_818


def test_small_models_have_the_expected_sizes() -> None:
    assert count_parameters(build_model("logreg", (8, 8, 1), 10)) == 64 * 10 + 10
    assert count_parameters(build_model("mlp", (8, 8, 1), 10, hidden_units=16)) == (
        64 * 16 + 16 + 16 * 10 + 10
    )


def test_initial_weights_depend_only_on_the_seed(
    digits: tuple[DatasetSpec, ArrayData, ArrayData], small: ArrayData
) -> None:
    spec = digits[0]
    first = LocalTrainer("cnn", spec, small, seed=3).initial_weights()
    second = LocalTrainer("cnn", spec, small, seed=3).initial_weights()
    other = LocalTrainer("cnn", spec, small, seed=4).initial_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    kernels = [i for i, w in enumerate(first) if w.ndim > 1]
    assert all(not np.array_equal(first[i], other[i]) for i in kernels)


def test_bad_model_requests_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        build_model("resnet", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="cnn"):
        build_model("cnn", (64,), 10)


# --- local training ------------------------------------------------------------------------------


def test_one_sgd_step_is_minus_lr_times_the_gradient(
    logreg_trainer: LocalTrainer, digits: tuple[DatasetSpec, ArrayData, ArrayData], small: ArrayData
) -> None:
    start = _perturbed(logreg_trainer.initial_weights(), seed=0)
    lr = 0.3
    result = logreg_trainer.train(start, TrainSpec(local_steps=1, batch_size=64, lr=lr))
    gradient = _gradient("logreg", start, small, digits[0])
    for delta, grad in zip(result.delta, gradient, strict=True):
        np.testing.assert_allclose(delta, -lr * grad, rtol=1e-4, atol=1e-7)
    assert result.steps == 1 and result.num_samples == SMALL_PARTITION


def test_two_steps_with_l2_and_prox_follow_the_objective(
    logreg_trainer: LocalTrainer, digits: tuple[DatasetSpec, ArrayData, ArrayData], small: ArrayData
) -> None:
    start = _perturbed(logreg_trainer.initial_weights(), seed=1)
    lr, l2, mu = 0.2, 0.1, 0.5
    spec = TrainSpec(local_steps=2, batch_size=SMALL_PARTITION, lr=lr, l2=l2, prox_mu=mu)
    result = logreg_trainer.train(start, spec)

    def objective_gradient(weights: Weights) -> Weights:
        grads = _gradient("logreg", weights, small, digits[0])
        return [
            g + (l2 * w if w.ndim > 1 else 0.0) + mu * (w - w0)  # L2 on kernels only
            for g, w, w0 in zip(grads, weights, start, strict=True)
        ]

    after_one = [w - lr * g for w, g in zip(start, objective_gradient(start), strict=True)]
    after_two = [w - lr * g for w, g in zip(after_one, objective_gradient(after_one), strict=True)]
    for delta, end, begin in zip(result.delta, after_two, start, strict=True):
        np.testing.assert_allclose(delta, end - begin, rtol=1e-4, atol=1e-6)


def test_the_step_is_traced_once_whatever_changes_between_rounds(
    logreg_trainer: LocalTrainer,
) -> None:
    weights = logreg_trainer.initial_weights()
    for lr, l2, batch in ((0.1, 0.0, 8), (0.05, 0.01, 16), (0.2, 0.0, 64)):
        logreg_trainer.train(weights, TrainSpec(local_steps=2, batch_size=batch, lr=lr, l2=l2))
    step = logreg_trainer._steps["sgd"]
    assert step.experimental_get_tracing_count() == 1


def test_rounds_draw_fresh_minibatches(logreg_trainer: LocalTrainer) -> None:
    weights = logreg_trainer.initial_weights()
    spec = TrainSpec(local_steps=1, batch_size=8)
    first = logreg_trainer.train(weights, spec).delta
    second = logreg_trainer.train(weights, spec).delta
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_same_seed_trains_identically(
    digits: tuple[DatasetSpec, ArrayData, ArrayData], small: ArrayData
) -> None:
    trainers = [LocalTrainer("logreg", digits[0], small, seed=9) for _ in range(2)]
    spec = TrainSpec(local_steps=3, batch_size=8)
    runs = [t.train(t.initial_weights(), spec).delta for t in trainers]
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))


def test_epochs_mode_counts_full_batches(logreg_trainer: LocalTrainer) -> None:
    spec = TrainSpec(local_steps=0, local_epochs=2, batch_size=16)
    result = logreg_trainer.train(logreg_trainer.initial_weights(), spec)
    assert result.steps == 2 * math.ceil(SMALL_PARTITION / 16)
    assert math.isfinite(result.loss) and result.seconds > 0


def test_wrong_weights_are_rejected_by_shape(logreg_trainer: LocalTrainer) -> None:
    weights = logreg_trainer.initial_weights()
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        logreg_trainer.train([weights[0], weights[1][:3]], TrainSpec())
    with pytest.raises(ValueError, match="arrays"):
        logreg_trainer.train(weights[:1], TrainSpec())


def test_train_spec_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        TrainSpec(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        TrainSpec(lr=0.0)
    with pytest.raises(ValueError, match="local_epochs"):
        TrainSpec(local_steps=0, local_epochs=0)


@pytest.mark.slow
def test_training_raises_accuracy_well_above_chance(
    mlp_trainer: LocalTrainer, digits: tuple[DatasetSpec, ArrayData, ArrayData]
) -> None:
    spec, _, test = digits
    evaluator = Evaluator("mlp", spec, test, hidden_units=32)
    weights = mlp_trainer.initial_weights()
    _, accuracy_before = evaluator.evaluate(weights)
    for _ in range(40):
        result = mlp_trainer.train(weights, TrainSpec(local_steps=1, batch_size=32, lr=0.2))
        for delta, weight in zip(result.delta, weights, strict=True):
            assert delta.dtype == np.float32 and delta.shape == weight.shape
            assert np.isfinite(delta).all()
        weights = [w + d for w, d in zip(weights, result.delta, strict=True)]
    _, accuracy_after = evaluator.evaluate(weights)
    assert accuracy_before < 0.3
    assert accuracy_after > 0.6  # chance is 0.1


@pytest.mark.slow
def test_adam_and_mixed_precision_train_to_finite_float32_deltas(
    digits: tuple[DatasetSpec, ArrayData, ArrayData], small: ArrayData
) -> None:
    k = keras()
    k.mixed_precision.set_global_policy("mixed_float16")
    try:
        trainer = LocalTrainer("mlp", digits[0], small)
    finally:
        k.mixed_precision.set_global_policy("float32")
    weights = trainer.initial_weights()
    for optimizer in ("sgd", "adam"):
        result = trainer.train(weights, TrainSpec(local_steps=3, optimizer=optimizer, lr=0.01))
        assert all(d.dtype == np.float32 and np.isfinite(d).all() for d in result.delta)
        assert any(np.abs(d).max() > 0 for d in result.delta)
    assert type(trainer._optimizers["adam"]).__name__ == "LossScaleOptimizer"


# --- evaluation ----------------------------------------------------------------------------------


def test_evaluator_matches_a_direct_computation(
    logreg_trainer: LocalTrainer, digits: tuple[DatasetSpec, ArrayData, ArrayData]
) -> None:
    spec, _, test = digits
    weights = _perturbed(logreg_trainer.initial_weights(), seed=2)
    loss, accuracy = Evaluator("logreg", spec, test, batch_size=100).evaluate(weights)
    model = build_model("logreg", spec.input_shape, spec.num_classes)
    model.set_weights(weights)
    probs = model(test.x, training=False).numpy().astype(np.float64)
    expected_loss = -np.mean(np.log(probs[np.arange(len(test)), test.y]))
    expected_accuracy = np.mean(np.argmax(probs, axis=1) == test.y)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy)


# --- device caps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_only() -> None:
    if tf().config.list_physical_devices("GPU"):
        pytest.skip("these cases describe a CPU-only machine; this one has a GPU")


@pytest.mark.parametrize(
    ("options", "note"),
    [
        ({"gpu_memory_limit_mb": 512, "memory_growth": False}, "memory limit of 512 MB"),
        ({"memory_growth": True}, "memory growth"),
        ({"memory_growth": False, "mixed_precision": True}, "mixed precision"),
    ],
)
def test_device_caps_on_cpu_become_notes_even_when_called_twice(
    cpu_only: None, options: dict[str, int | bool], note: str
) -> None:
    for _ in range(2):
        with capture_logs() as logs:
            report = apply_device_caps(**options)  # type: ignore[arg-type]
        assert report.gpus == 0
        assert (report.memory_limit_mb, report.memory_growth, report.mixed_precision) == (
            0,
            False,
            False,
        )
        assert len(report.notes) == 1 and note in report.notes[0]
        assert [entry["note"] for entry in logs] == list(report.notes)
    assert keras().mixed_precision.global_policy().name == "float32"


def test_no_caps_asked_means_no_notes(cpu_only: None) -> None:
    report = apply_device_caps(memory_growth=False)
    assert report.notes == ()


def test_quiet_env_fills_in_only_unset_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    quiet_tensorflow_env()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"


@pytest.mark.parametrize("keep", [True, False])
def test_a_daemon_worker_drops_the_decoded_dataset_once_its_partition_is_cut(keep: bool) -> None:
    from flq.config import default_config, with_overrides
    from flq.learning import data as data_module
    from flq.worker.training import build_trainer

    cfg = with_overrides(
        default_config(), {"dataset.name": "digits", "model.name": "logreg", "lora.rank": 0}
    )
    data_module.clear_cache()
    built, _ = build_trainer(cfg, "w0", 0, keep_data_cache=keep)
    assert built.num_samples > 0
    assert bool(data_module._cache) is keep
    weights = built.trainer.initial_weights()
    result = built.train(weights, TrainSpec(lr=0.1))
    assert all(np.isfinite(d).all() for d in result.delta)


@pytest.mark.parametrize(("prefetch", "parallel", "tuned"), [(2, 2, False), (-1, 2, True)])
def test_autotune_runs_only_when_a_knob_asks_for_it(
    digits: tuple[DatasetSpec, ArrayData, ArrayData], prefetch: int, parallel: int, tuned: bool
) -> None:
    # tf.data's autotuner thread makes destroying an iterator wait for its next wake-up (up to a
    # minute): with fixed knobs there is nothing to tune, so it must be off.
    trainer = LocalTrainer(
        "logreg", digits[0], digits[1], seed=0, prefetch_size=prefetch, num_parallel_calls=parallel
    )
    enabled = trainer._make_dataset(16).options().autotune.enabled  # None: TF's default, on
    assert (enabled is not False) is tuned

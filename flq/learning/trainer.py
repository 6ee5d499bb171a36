"""Local training and evaluation on one node's data.

`LocalTrainer.train` runs a worker's part of a round: load the weights the master sent, take
minibatch steps on the objective

    mean cross-entropy + l2/2 * sum ||kernel||^2 + prox_mu/2 * ||w - w_start||^2

and return the update delta = w_end - w_start. L2 and the proximal term live in the step, not the
model, so the master can change them every round without rebuilding anything.

Minibatches come from one persistent shuffled, repeated tf.data iterator per batch size, so each
round continues where the last one stopped instead of replaying the first batches. The step is a
tf.function with an unknown batch dimension and the per-round numbers (lr, l2, prox_mu) held in
variables: it is traced once and never again. Optimizer state (Adam's moments) is reset at the
start of each round: a worker's update depends only on the weights it was sent and its own data,
which is what the master's stale reuse and a reconnect both assume.

`train` is synchronous and CPU/GPU bound; the worker daemon calls it from a thread. One trainer
runs one `train` at a time (it owns one model).

"Weights" here are the weights that travel (flq.learning.lora): the whole model, or with LoRA only
the adapters, in model.trainable_weights order; the frozen base is rebuilt from `model_seed`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np

from flq.learning.architecture import architecture_of
from flq.learning.data import ArrayData, DatasetSpec
from flq.learning.lora import (
    LoraSpec,
    apply_lora,
    exchanged_variables,
    get_exchanged,
    penalised_variables,
    set_exchanged,
)
from flq.learning.models import KerasModel, ModelRecipe
from flq.learning.plugins import PluginError
from flq.learning.tfimport import keras, tf
from flq.types import TrainResult, TrainSpec

AUTOTUNE: Final = -1  # for prefetch_size / num_parallel_calls: let tf.data choose

Weights = list[np.ndarray]
_Step = Callable[[Any, Any], Any]


class LocalTrainer:
    def __init__(
        self,
        model_name: str | ModelRecipe,
        spec: DatasetSpec,
        data: ArrayData,
        *,
        hidden_units: int = 64,
        seed: int = 0,
        prefetch_size: int = 2,
        num_parallel_calls: int = 2,
        model_seed: int | None = None,
        lora: LoraSpec | None = None,
    ) -> None:
        """`seed` drives shuffling (and the model unless `model_seed` is given: a federation
        passes its own seed there, so LoRA's frozen base is the same on every node)."""
        _check_data(spec, data)
        if prefetch_size < AUTOTUNE or num_parallel_calls < AUTOTUNE:
            raise ValueError(
                "prefetch_size / num_parallel_calls: expected >= 0, or -1 for AUTOTUNE"
            )
        model_seed = seed if model_seed is None else model_seed
        recipe = _recipe(model_name, hidden_units, model_seed)
        self._model = recipe.build(spec.input_shape, spec.num_classes)
        self.architecture = architecture_of(self._model)  # before LoRA: the model's own
        _check_fits(self._model, spec, recipe)
        apply_lora(self._model, lora or LoraSpec(), seed=model_seed)
        self._initial = get_exchanged(self._model)
        self._data = _as_model_inputs(data)
        self._seed = seed
        self._prefetch_size = prefetch_size
        self._num_parallel_calls = num_parallel_calls
        self._objective = _Objective(self._model)
        self._batches: dict[int, Iterator[Any]] = {}
        self._optimizers: dict[str, Any] = {}
        self._steps: dict[str, _Step] = {}

    @property
    def num_samples(self) -> int:
        return len(self._data)

    def initial_weights(self) -> Weights:
        """The seeded initial model: identical on every node built with the same seed."""
        return [w.copy() for w in self._initial]

    @property
    def model(self) -> KerasModel:
        return self._model

    def train(self, weights: Weights, spec: TrainSpec) -> TrainResult:
        start = as_model_weights(self._model, weights)
        set_exchanged(self._model, start)
        self._objective.begin_round(start, l2=spec.l2, prox_mu=spec.prox_mu)
        step = self._step_for(spec.optimizer, spec.lr)
        batches = self._batches_for(spec.batch_size)
        steps = self._steps_in(spec)
        began = time.perf_counter()
        # Losses stay tensors until the end: reading each one would stall a GPU every step.
        losses = [step(*next(batches)) for _ in range(steps)]
        mean_loss = float(tf().add_n(losses)) / steps
        end = get_exchanged(self._model)
        seconds = time.perf_counter() - began
        return TrainResult(
            delta=[after - before for after, before in zip(end, start, strict=True)],
            loss=mean_loss,
            num_samples=self.num_samples,
            steps=steps,
            seconds=seconds,
        )

    def _steps_in(self, spec: TrainSpec) -> int:
        if spec.local_steps > 0:
            return spec.local_steps
        # An epoch is ceil(n / batch) full batches drawn from the repeated stream.
        return spec.local_epochs * math.ceil(self.num_samples / self._batch_size(spec.batch_size))

    def _batch_size(self, requested: int) -> int:
        # A partition smaller than the batch trains on all of itself rather than on repeats.
        return min(requested, self.num_samples)

    def _batches_for(self, batch_size: int) -> Iterator[Any]:
        size = self._batch_size(batch_size)
        if size not in self._batches:
            self._batches[size] = iter(self._make_dataset(size))
        return self._batches[size]

    def _make_dataset(self, batch_size: int) -> Any:
        """Infinite full batches: shuffle indices (not samples), repeat, batch, then gather.

        Shuffling indices keeps the shuffle buffer at 8 bytes a sample instead of a second copy
        of the images. Repeating before batching lets batches run across epoch boundaries, so
        every batch is full (one traced shape) and no sample is dropped for good.
        """
        tf_ = tf()
        samples, labels = tf_.constant(self._data.x), tf_.constant(self._data.y)

        def gather(indices: Any) -> tuple[Any, Any]:
            return tf_.gather(samples, indices), tf_.gather(labels, indices)

        dataset = (
            tf_.data.Dataset.range(self.num_samples)
            .shuffle(self.num_samples, seed=self._seed, reshuffle_each_iteration=True)
            .repeat()
            .batch(batch_size, drop_remainder=True)
            .map(gather, num_parallel_calls=_tf_data_knob(self._num_parallel_calls))
        )
        if self._prefetch_size != 0:
            dataset = dataset.prefetch(_tf_data_knob(self._prefetch_size))
        if AUTOTUNE not in (self._prefetch_size, self._num_parallel_calls):
            # Nothing to tune, and tf.data's autotuner thread sleeps between optimisation
            # passes: destroying the iterator waits for it to wake, up to a minute per worker,
            # which made a 20-worker `flq simulate` linger for minutes after its last round.
            options = tf_.data.Options()
            options.autotune.enabled = False
            dataset = dataset.with_options(options)
        return dataset

    def _step_for(self, name: str, lr: float) -> _Step:
        if name not in self._steps:
            # float16 gradients underflow without loss scaling.
            loss_scaling = _computes_in_float16(self._model)
            self._optimizers[name] = _make_optimizer(name, lr, loss_scaling=loss_scaling)
            self._steps[name] = self._make_step(self._optimizers[name])
        optimizer = self._optimizers[name]
        _reset_optimizer(optimizer)
        _inner(optimizer).learning_rate = lr
        return self._steps[name]

    def _make_step(self, optimizer: Any) -> _Step:
        tf_ = tf()
        model, objective = self._model, self._objective
        variables = model.trainable_variables
        optimizer.build(variables)
        scales_loss = _is_loss_scaled(optimizer)
        signature = [
            tf_.TensorSpec((None, *self._data.x.shape[1:]), tf_.float32),
            tf_.TensorSpec((None,), tf_.int64),
        ]

        @tf_.function(input_signature=signature)  # type: ignore[untyped-decorator]
        def step(x: Any, y: Any) -> Any:
            with tf_.GradientTape() as tape:
                loss = objective(y, model(x, training=True))
                scaled = optimizer.scale_loss(loss) if scales_loss else loss
            gradients = tape.gradient(scaled, variables)
            # apply_gradients, not Keras 3's apply: it exists in Keras 2 (JetPack's TF) too.
            optimizer.apply_gradients(list(zip(gradients, variables, strict=True)))
            return loss

        return step  # type: ignore[no-any-return]


class Evaluator:
    """Loss and accuracy of given weights on a fixed test set (batched, one traced function)."""

    def __init__(
        self,
        model_name: str | ModelRecipe,
        spec: DatasetSpec,
        test: ArrayData,
        *,
        hidden_units: int = 64,
        batch_size: int = 1024,
        seed: int = 0,
        lora: LoraSpec | None = None,
    ) -> None:
        _check_data(spec, test)
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}, expected >= 1")
        tf_ = tf()
        recipe = _recipe(model_name, hidden_units, seed)
        self._model = recipe.build(spec.input_shape, spec.num_classes)
        _check_fits(self._model, spec, recipe)
        apply_lora(self._model, lora or LoraSpec(), seed=seed)
        test = _as_model_inputs(test)
        self._num_samples = len(test)
        self._batches = tf_.data.Dataset.from_tensor_slices((test.x, test.y)).batch(batch_size)
        self._sums = self._make_sums(spec.input_shape)

    def evaluate(self, weights: Weights) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of `weights` on the test set."""
        set_exchanged(self._model, as_model_weights(self._model, weights))
        loss_sum, correct = 0.0, 0
        for x, y in self._batches:
            batch_loss, batch_correct = self._sums(x, y)
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
        return loss_sum / self._num_samples, correct / self._num_samples

    def _make_sums(self, input_shape: tuple[int, ...]) -> _Step:
        tf_, k = tf(), keras()
        model = self._model
        signature = [
            tf_.TensorSpec((None, *input_shape), tf_.float32),
            tf_.TensorSpec((None,), tf_.int64),
        ]

        @tf_.function(input_signature=signature)  # type: ignore[untyped-decorator]
        def sums(x: Any, y: Any) -> tuple[Any, Any]:
            probs = model(x, training=False)
            loss_sum = tf_.reduce_sum(k.losses.sparse_categorical_crossentropy(y, probs))
            hits = tf_.equal(tf_.argmax(probs, axis=-1, output_type=tf_.int64), y)
            return loss_sum, tf_.reduce_sum(tf_.cast(hits, tf_.int64))

        return sums  # type: ignore[no-any-return]


def _recipe(model: str | ModelRecipe, hidden_units: int, seed: int) -> ModelRecipe:
    if isinstance(model, ModelRecipe):
        return model
    return ModelRecipe(name=model, hidden_units=hidden_units, seed=seed)


def _check_fits(model: KerasModel, spec: DatasetSpec, recipe: ModelRecipe) -> None:
    """The data's samples and labels fit the model (a user's builder fixes its own shapes)."""
    takes = tuple(model.input_shape[1:]) if isinstance(model.input_shape, tuple) else None
    if takes is not None and takes != tuple(spec.input_shape):
        raise PluginError(
            f"{recipe.label} takes samples of shape {takes}, but {spec.name} has "
            f"{tuple(spec.input_shape)}: reshape them in the loader or change the model"
        )
    classes = model.output_shape[-1]
    if isinstance(classes, int) and classes < spec.num_classes:
        raise PluginError(
            f"{recipe.label} outputs {classes} classes, but {spec.name} has labels up to "
            f"{spec.num_classes - 1}"
        )


def as_model_weights(model: KerasModel, weights: Weights) -> Weights:
    """`weights` as float32 arrays, checked against the shapes of the weights the model exchanges
    (ValueError names the first mismatch)."""
    expected = [tuple(w.shape) for w in exchanged_variables(model)]
    if len(weights) != len(expected):
        raise ValueError(f"weights: got {len(weights)} arrays, the model has {len(expected)}")
    arrays = [np.asarray(w, dtype=np.float32) for w in weights]
    for position, (array, shape) in enumerate(zip(arrays, expected, strict=True)):
        if array.shape != shape:
            raise ValueError(f"weights[{position}]: got shape {array.shape}, expected {shape}")
    return arrays


class _Objective:
    """Cross-entropy plus the per-round L2 and proximal terms (their weights live in variables,
    so changing them does not retrace the step)."""

    def __init__(self, model: KerasModel) -> None:
        tf_ = tf()
        # Kept here, not looked up in __call__: AutoGraph would try to convert tf()'s body.
        self._tf, self._keras = tf_, keras()
        self._variables = model.trainable_variables
        self._kernels = penalised_variables(model)
        self._start = [
            tf_.Variable(np.zeros(v.shape, np.float32), trainable=False) for v in self._variables
        ]
        self._positions = _trainable_positions(model)
        self._l2 = tf_.Variable(0.0, trainable=False)
        self._prox_mu = tf_.Variable(0.0, trainable=False)

    def begin_round(self, start: Weights, *, l2: float, prox_mu: float) -> None:
        for variable, position in zip(self._start, self._positions, strict=True):
            variable.assign(start[position])
        self._l2.assign(l2)
        self._prox_mu.assign(prox_mu)

    def __call__(self, labels: Any, probs: Any) -> Any:
        tf_, k = self._tf, self._keras
        cross_entropy = tf_.reduce_mean(k.losses.sparse_categorical_crossentropy(labels, probs))
        kernel_norm = tf_.add_n([tf_.reduce_sum(tf_.square(w)) for w in self._kernels])
        drift = tf_.add_n(
            [
                tf_.reduce_sum(tf_.square(w - w0))
                for w, w0 in zip(self._variables, self._start, strict=True)
            ]
        )
        return cross_entropy + 0.5 * self._l2 * kernel_norm + 0.5 * self._prox_mu * drift


def _trainable_positions(model: KerasModel) -> list[int]:
    """Where each trainable variable sits in the exchanged weights (the Weights order)."""
    position_of = {id(w): i for i, w in enumerate(exchanged_variables(model))}
    return [position_of[id(v)] for v in model.trainable_variables]


def _make_optimizer(name: str, lr: float, *, loss_scaling: bool) -> Any:
    k = keras()
    optimizer = k.optimizers.SGD(lr) if name == "sgd" else k.optimizers.Adam(lr)
    return k.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def _computes_in_float16(model: KerasModel) -> bool:
    # The policy in force when the model was built decides, not the one in force now.
    return any(layer.compute_dtype == "float16" for layer in model.layers)


def _is_loss_scaled(optimizer: Any) -> bool:
    return hasattr(optimizer, "inner_optimizer")


def _inner(optimizer: Any) -> Any:
    return optimizer.inner_optimizer if _is_loss_scaled(optimizer) else optimizer


def _reset_optimizer(optimizer: Any) -> None:
    """Zero the step counter and slots (Adam's moments); keep the learning-rate variable and the
    loss scale, which are settings rather than history."""
    inner = _inner(optimizer)
    if not inner.built:
        return
    learning_rate = inner.learning_rate
    for variable in inner.variables:
        if variable is not learning_rate:
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))


def _tf_data_knob(value: int) -> Any:
    return tf().data.AUTOTUNE if value == AUTOTUNE else value


def _as_model_inputs(data: ArrayData) -> ArrayData:
    """float32 samples and int64 labels, the dtypes the traced functions are declared with."""
    return ArrayData(np.asarray(data.x, dtype=np.float32), np.asarray(data.y, dtype=np.int64))


def _check_data(spec: DatasetSpec, data: ArrayData) -> None:
    if len(data) == 0:
        raise ValueError(f"{spec.name}: no samples to train or evaluate on")
    if tuple(data.x.shape[1:]) != tuple(spec.input_shape):
        raise ValueError(
            f"{spec.name}: samples have shape {tuple(data.x.shape[1:])}, "
            f"the spec says {spec.input_shape}"
        )
    if data.x.shape[0] != data.y.shape[0]:
        raise ValueError(f"{spec.name}: {data.x.shape[0]} samples but {data.y.shape[0]} labels")

"""Knowledge fusion on the master: move a large teacher's knowledge into the global model.

Two methods, both trained on data only the master holds (`fusion.server_share` of the training
set, removed from every worker's partition), both returning new global weights that the round
engine checks and applies after the server step (flq/master/fusion.py):

- `Distiller`: a few Adam steps of the global model on the server data against the teacher's
  softened outputs (Hinton et al.'s knowledge distillation) and the labels. The teacher is fixed,
  so its softened outputs on the server data are computed once, at start-up: a fusion costs only
  the student's steps.
- `ParamAttention` (after MergeNet, Li et al. 2024, arXiv 2404.13322): a small cross-attention
  module reads the teacher's parameters and proposes an adjustment of chosen Dense layers of the
  student; it is trained with the student's own loss on the server data, through the adjusted
  layers (the student's weights stay fixed while it learns). Each output unit of a Dense layer
  is one token: its incoming weights and its bias (a class prototype for the output layer). The
  student's tokens ask, the teacher's tokens of the paired layer answer; the module's output
  projection starts at zero, so the first adjustment is none and it can only learn to help. The
  module and its optimizer persist across rounds (MergeNet trains its module throughout) but not
  across a master restart.

Which layers, and why the output layer by default: it is the one layer whose units mean the same
in any two classifiers of the task (unit c scores class c, for the teacher's output layer too), so
the attention pairs like with like; it is tiny (1,290 values in the CNN), so the module stays
small enough for a board-sized master; and under label-skewed (non-IID) data it is the most
biased layer of a federated model (each worker pushes up the classes it holds), which a teacher
trained on balanced server data can correct. `fusion.student_layers` can add hidden Dense layers
(paired with the teacher's layer of the same name).

TensorFlow is imported inside the functions (flq.learning's rule).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from flq.errors import UsageError
from flq.learning.data import ArrayData, DatasetSpec
from flq.learning.lora import exchanged_variables, get_exchanged, set_exchanged
from flq.learning.models import KerasModel, build_model
from flq.learning.tfimport import keras, tf

PROBE_SAMPLES: Final = 32  # server samples the teacher is tried on at start-up
PROBABILITY_TOLERANCE: Final = 1e-3  # rows summing to 1 within this are probabilities
LOG_FLOOR: Final = 1e-7  # probabilities are clipped here before their log (logits up to a constant)
TEACHER_BATCH: Final = 512

Weights = list[np.ndarray]


class FusionSetupError(UsageError, ValueError):
    """Fusion cannot start as configured (teacher file, shapes, server data): exit 2."""


@dataclass(frozen=True)
class FusionSettings:
    """What a fuser needs from the config's [fusion] and [model] sections."""

    method: str
    teacher: str
    model_name: str
    hidden_units: int = 64
    steps: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 2.0
    label_weight: float = 0.5
    student_layers: tuple[str, ...] = ("probs",)
    attention_dim: int = 64
    attention_heads: int = 8
    attention_blocks: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Fused:
    """A fusion's proposal: new global weights and the mean server-side loss of its steps."""

    weights: Weights
    loss: float


# ---------------------------------------------------------------- the teacher


@dataclass(frozen=True)
class Teacher:
    model: KerasModel
    outputs_probabilities: bool  # False: it returns logits (softmax is applied to them)

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        """log p(class | x) for every sample, in batches (float32)."""
        tf_ = tf()
        parts = []
        for start in range(0, len(x), TEACHER_BATCH):
            out = self.model(x[start : start + TEACHER_BATCH], training=False)
            out = tf_.math.log(tf_.maximum(out, LOG_FLOOR)) if self.outputs_probabilities else out
            parts.append(tf_.nn.log_softmax(tf_.cast(out, tf_.float32)).numpy())
        return np.concatenate(parts).astype(np.float32)


KERAS_MAGIC: Final = (b"PK\x03\x04", b"\x89HDF\r\n\x1a\n")  # .keras is a zip; .h5 is HDF5


def teacher_file_problem(path_text: str) -> str | None:
    """What is wrong with a teacher file that can be told without TensorFlow, or None (the
    master checks this at start-up, before it imports TensorFlow)."""
    path = Path(path_text)
    if not path.is_file():
        return f"fusion.teacher: {path} does not exist or is not a file"
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return f"fusion.teacher: {path} cannot be read ({error.strerror or error})"
    if not head.startswith(KERAS_MAGIC):
        return f"fusion.teacher: {path} is not a Keras model file (neither .keras nor HDF5)"
    return None


def load_teacher(path_text: str, spec: DatasetSpec, probe: np.ndarray) -> Teacher:
    """Load the teacher once and check it fits the task: the dataset's input shape in, one score
    per class out, finite on real samples. Every failure is a FusionSetupError naming the file."""
    path = Path(path_text)
    problem = teacher_file_problem(path_text)
    if problem is not None:
        raise FusionSetupError(problem)
    try:
        with warnings.catch_warnings():
            # Keras' loader trips numpy 2's __array__(copy=...) DeprecationWarning (not ours).
            warnings.simplefilter("ignore", DeprecationWarning)
            model = keras().saving.load_model(path, compile=False)
    except Exception as error:  # keras raises ValueError, OSError, zip and h5 errors alike
        raise FusionSetupError(
            f"fusion.teacher: {path} is not a Keras model file Keras can load "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from None
    expected_in = tuple(spec.input_shape)
    got_in = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if got_in != expected_in:
        raise FusionSetupError(
            f"fusion.teacher: {path} takes inputs of shape {got_in}; "
            f"dataset {spec.name} has samples of shape {expected_in}"
        )
    try:
        out = np.asarray(model(probe[:PROBE_SAMPLES], training=False), dtype=np.float64)
    except Exception as error:
        raise FusionSetupError(
            f"fusion.teacher: {path} fails on {spec.name} samples ({_first_line(error)})"
        ) from None
    if out.ndim != 2 or out.shape[1] != spec.num_classes:
        raise FusionSetupError(
            f"fusion.teacher: {path} returns outputs of shape {out.shape[1:]}; "
            f"dataset {spec.name} has {spec.num_classes} classes"
        )
    if not np.isfinite(out).all():
        raise FusionSetupError(f"fusion.teacher: {path} returns non-finite outputs")
    sums = out.sum(axis=1)
    probabilities = bool(out.min() >= 0 and np.abs(sums - 1).max() <= PROBABILITY_TOLERANCE)
    return Teacher(model, probabilities)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def teacher_accuracy(teacher: Teacher, data: ArrayData) -> float:
    return float(np.mean(np.argmax(teacher.log_probs(data.x), axis=1) == data.y))


# ---------------------------------------------------------------- the student


class _Student:
    """The global model's architecture, loaded with the weights of each fusion."""

    def __init__(self, settings: FusionSettings, spec: DatasetSpec, initial: Weights) -> None:
        self.model = build_model(
            settings.model_name,
            spec.input_shape,
            spec.num_classes,
            hidden_units=settings.hidden_units,
            seed=settings.seed,
        )
        shapes = [tuple(w.shape) for w in get_exchanged(self.model)]
        given = [tuple(w.shape) for w in initial]
        if shapes != given:
            raise FusionSetupError(
                f"fusion: the global model's shapes {given} are not model.name = "
                f"{settings.model_name!r}'s {shapes}"
            )

    def load(self, weights: Weights) -> None:
        set_exchanged(self.model, [np.asarray(w, dtype=np.float32) for w in weights])

    def weights(self) -> Weights:
        return get_exchanged(self.model)


class _Batches:
    """Seeded minibatches of the server data (indices drawn without replacement per epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self._size = size
        self._batch = min(batch_size, size)
        self._rng = np.random.default_rng(seed)
        self._order = np.zeros(0, dtype=np.int64)

    def next(self) -> np.ndarray:
        if self._order.size < self._batch:
            self._order = np.concatenate([self._order, self._rng.permutation(self._size)])
        batch, self._order = self._order[: self._batch], self._order[self._batch :]
        return batch


def _adam(lr: float) -> Any:
    return keras().optimizers.Adam(lr)


def _reset(optimizer: Any) -> None:
    """Zero Adam's step counter and moments, keep its learning rate."""
    for variable in optimizer.variables:
        if variable is not optimizer.learning_rate:
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))


def _mean(losses: list[Any]) -> float:
    return float(tf().add_n(losses)) / len(losses) if losses else math.nan


# ---------------------------------------------------------------- distill


class Distiller:
    """`fuse`: the global model after `steps` Adam steps on
    (1 - label_weight) * T^2 * CE(teacher_T, student_T) + label_weight * CE(labels, student),
    where x_T = softmax(log x / T); the teacher's softened outputs are computed once."""

    def __init__(
        self,
        settings: FusionSettings,
        spec: DatasetSpec,
        data: ArrayData,
        teacher: Teacher,
        initial: Weights,
    ) -> None:
        tf_ = tf()
        self.settings = settings
        self._student = _Student(settings, spec, initial)
        self._x = tf_.constant(np.asarray(data.x, np.float32))
        self._y = tf_.constant(np.asarray(data.y, np.int64))
        soft = tf_.nn.softmax(tf_.constant(teacher.log_probs(data.x)) / settings.temperature)
        self._soft = tf_.constant(soft)
        self._batches = _Batches(len(data), settings.batch_size, settings.seed)
        self._optimizer = _adam(settings.lr)
        self._step = self._make_step()

    def fuse(self, weights: Weights) -> Fused:
        self._student.load(weights)
        _reset(self._optimizer)
        tf_ = tf()
        losses = []
        for _ in range(self.settings.steps):
            index = tf_.constant(self._batches.next())
            losses.append(self._step(index))
        return Fused(self._student.weights(), _mean(losses))

    def _make_step(self) -> Any:
        tf_, k = tf(), keras()
        model, optimizer = self._student.model, self._optimizer
        variables = model.trainable_variables
        optimizer.build(variables)
        temperature = self.settings.temperature
        soft_weight = (1.0 - self.settings.label_weight) * temperature**2
        label_weight = self.settings.label_weight
        x_all, y_all, soft_all = self._x, self._y, self._soft

        # autograph=False: the step has no data-dependent control flow to convert, and tracing
        # without AutoGraph is quicker (seconds on a loaded board).
        @tf_.function(input_signature=[tf_.TensorSpec((None,), tf_.int64)], autograph=False)  # type: ignore[untyped-decorator]
        def step(index: Any) -> Any:
            x, y, soft = (tf_.gather(t, index) for t in (x_all, y_all, soft_all))
            with tf_.GradientTape() as tape:
                probs = model(x, training=True)
                log_probs = tf_.math.log(tf_.maximum(probs, LOG_FLOOR))
                student_soft = tf_.nn.log_softmax(log_probs / temperature)
                kd = -tf_.reduce_mean(tf_.reduce_sum(soft * student_soft, axis=1))
                ce = tf_.reduce_mean(k.losses.sparse_categorical_crossentropy(y, probs))
                loss = soft_weight * kd + label_weight * ce
            gradients = tape.gradient(loss, variables)
            optimizer.apply_gradients(list(zip(gradients, variables, strict=True)))
            return loss

        return step


# ---------------------------------------------------------------- param_attention


@dataclass(frozen=True)
class _LayerPair:
    name: str
    kernel: int  # positions of the student layer's kernel and bias in the weights list
    bias: int
    teacher_tokens: np.ndarray  # (teacher units, teacher fan-in + 1)


def _dense_layers(model: KerasModel) -> list[Any]:
    dense = keras().layers.Dense
    return [layer for layer in model.layers if isinstance(layer, dense)]


def _tokens(kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """One token per output unit: its incoming weights and its bias."""
    return np.concatenate([kernel.T, bias[:, None]], axis=1).astype(np.float32)


def _pair_layers(
    student: KerasModel, teacher: KerasModel, names: tuple[str, ...]
) -> list[_LayerPair]:
    student_dense = {layer.name: layer for layer in _dense_layers(student)}
    teacher_dense = _dense_layers(teacher)
    if not teacher_dense:
        raise FusionSetupError("fusion.teacher: param_attention needs a teacher with Dense layers")
    by_name = {layer.name: layer for layer in teacher_dense}
    position = {id(v): i for i, v in enumerate(exchanged_variables(student))}
    output_name = _dense_layers(student)[-1].name
    pairs = []
    for name in names:
        layer = student_dense.get(name)
        if layer is None:
            raise FusionSetupError(
                f"fusion.student_layers: the student has no Dense layer {name!r} "
                f"(it has {', '.join(student_dense)})"
            )
        partner = teacher_dense[-1] if name == output_name else by_name.get(name)
        if partner is None or partner.bias is None:
            raise FusionSetupError(
                f"fusion.student_layers: the teacher has no Dense layer {name!r} with a bias "
                f"to pair with (its Dense layers: {', '.join(by_name)})"
            )
        teacher_tokens = _tokens(partner.kernel.numpy(), partner.bias.numpy())
        pairs.append(
            _LayerPair(name, position[id(layer.kernel)], position[id(layer.bias)], teacher_tokens)
        )
    return pairs


class _AttentionModule:
    """Student tokens attend to teacher tokens through `blocks` cross-attention blocks (multi-head
    attention, residual, layer norm, a small feed-forward), then a zero-initialised projection
    back to the student's token width gives the adjustment of each unit."""

    def __init__(self, student_width: int, settings: FusionSettings, seed: int) -> None:
        k = keras()
        d, heads = settings.attention_dim, settings.attention_heads
        init = k.initializers.GlorotUniform
        self.student_in = k.layers.Dense(d, kernel_initializer=init(seed=seed))
        self.teacher_in = k.layers.Dense(d, kernel_initializer=init(seed=seed + 1))
        self.blocks = [
            (
                k.layers.MultiHeadAttention(
                    heads, d // heads, kernel_initializer=init(seed=seed + 2 + 3 * b)
                ),
                k.layers.LayerNormalization(),
                k.layers.Dense(
                    2 * d, activation="relu", kernel_initializer=init(seed=seed + 3 + 3 * b)
                ),
                k.layers.Dense(d, kernel_initializer=init(seed=seed + 4 + 3 * b)),
                k.layers.LayerNormalization(),
            )
            for b in range(settings.attention_blocks)
        ]
        self.out = k.layers.Dense(student_width, kernel_initializer="zeros")

    def __call__(self, student_tokens: Any, teacher_tokens: Any) -> Any:
        query = self.student_in(student_tokens[None])
        context = self.teacher_in(teacher_tokens[None])
        for attention, norm1, ff_in, ff_out, norm2 in self.blocks:
            query = norm1(query + attention(query, context))
            query = norm2(query + ff_out(ff_in(query)))
        return self.out(query)[0]

    def variables(self) -> list[Any]:
        layers = [self.student_in, self.teacher_in, self.out, *(x for b in self.blocks for x in b)]
        return [v for layer in layers for v in layer.trainable_variables]


class ParamAttention:
    """`fuse`: the global model with its chosen Dense layers adjusted by the attention module,
    after `steps` Adam steps of the module on the student's loss (labels' cross-entropy) through
    the adjusted layers."""

    def __init__(
        self,
        settings: FusionSettings,
        spec: DatasetSpec,
        data: ArrayData,
        teacher: Teacher,
        initial: Weights,
    ) -> None:
        tf_ = self._tf = tf()  # kept: the traced step must not call tf() (it touches os.environ)
        self.settings = settings
        self._student = _Student(settings, spec, initial)
        self._pairs = _pair_layers(self._student.model, teacher.model, settings.student_layers)
        self._modules = [
            _AttentionModule(
                initial[pair.kernel].shape[0] + 1, settings, settings.seed * 64 + 16 * i
            )
            for i, pair in enumerate(self._pairs)
        ]
        self._teacher_tokens = [tf_.constant(pair.teacher_tokens) for pair in self._pairs]
        for module, pair, theirs in zip(
            self._modules, self._pairs, self._teacher_tokens, strict=True
        ):
            # Built here, eagerly: Keras layers create their variables on their first call.
            module(tf_.constant(_tokens(initial[pair.kernel], initial[pair.bias])), theirs)
        self._x = tf_.constant(np.asarray(data.x, np.float32))
        self._y = tf_.constant(np.asarray(data.y, np.int64))
        self._batches = _Batches(len(data), settings.batch_size, settings.seed)
        self._optimizer = _adam(settings.lr)
        self._step = self._make_step()

    def fuse(self, weights: Weights) -> Fused:
        tf_ = tf()
        self._student.load(weights)
        student_tokens = [
            tf_.constant(_tokens(weights[p.kernel], weights[p.bias])) for p in self._pairs
        ]
        losses = [
            self._step(tf_.constant(self._batches.next()), *student_tokens)
            for _ in range(self.settings.steps)
        ]
        adjusted = [np.array(w, dtype=np.float32) for w in weights]
        for pair, module, mine, theirs in zip(
            self._pairs, self._modules, student_tokens, self._teacher_tokens, strict=True
        ):
            delta = np.asarray(module(mine, theirs), dtype=np.float32)
            adjusted[pair.kernel] = adjusted[pair.kernel] + delta[:, :-1].T
            adjusted[pair.bias] = adjusted[pair.bias] + delta[:, -1]
        return Fused(adjusted, _mean(losses))

    def _forward(self, x: Any, replaced: dict[str, tuple[Any, Any]]) -> Any:
        """The student on `x` with the named Dense layers' kernel and bias replaced."""
        tf_ = self._tf
        for layer in self._student.model.layers:
            if layer.name in replaced:
                kernel, bias = replaced[layer.name]
                x = layer.activation(tf_.matmul(x, kernel) + bias)
            else:
                x = layer(x, training=False)
        return x

    def _make_step(self) -> Any:
        tf_, k = tf(), keras()
        pairs, modules, teacher_tokens = self._pairs, self._modules, self._teacher_tokens
        variables = [v for m in modules for v in m.variables()]
        optimizer = self._optimizer
        optimizer.build(variables)
        x_all, y_all = self._x, self._y
        forward = self._forward

        @tf_.function(autograph=False)  # type: ignore[untyped-decorator]
        def step(index: Any, *student_tokens: Any) -> Any:
            x, y = tf_.gather(x_all, index), tf_.gather(y_all, index)
            with tf_.GradientTape() as tape:
                replaced = {}
                for pair, module, mine, theirs in zip(
                    pairs, modules, student_tokens, teacher_tokens, strict=True
                ):
                    adjusted = mine + module(mine, theirs)
                    replaced[pair.name] = (tf_.transpose(adjusted[:, :-1]), adjusted[:, -1])
                probs = forward(x, replaced)
                loss = tf_.reduce_mean(k.losses.sparse_categorical_crossentropy(y, probs))
            gradients = tape.gradient(loss, variables)
            optimizer.apply_gradients(list(zip(gradients, variables, strict=True)))
            return loss

        return step


FUSERS: Final[dict[str, type[Distiller] | type[ParamAttention]]] = {
    "distill": Distiller,
    "param_attention": ParamAttention,
}


def build_fuser(
    settings: FusionSettings, spec: DatasetSpec, data: ArrayData, initial: Weights
) -> Distiller | ParamAttention:
    """Load the teacher and build the configured fuser; FusionSetupError if anything misfits."""
    if len(data) == 0:
        raise FusionSetupError("fusion: the master holds no server data (fusion.server_share)")
    teacher = load_teacher(settings.teacher, spec, np.asarray(data.x, np.float32))
    fuser_type = FUSERS.get(settings.method)
    if fuser_type is None:
        raise FusionSetupError(
            f"fusion.method: got {settings.method!r}, expected one of {list(FUSERS)}"
        )
    return fuser_type(settings, spec, data, teacher, initial)

"""The models FLQ trains, built identically on every node.

Every layer gets its own integer-seeded initializer, so the same (name, shape, classes, seed)
gives bit-identical initial weights in every process: the master and all workers start from one
model without shipping it. No regulariser lives in the model; the training step adds L2 so the
master can change it per round. The output layer always computes in float32 (softmax in float16
under mixed precision loses too much). Dense layers have fixed names (mlp: hidden, probs; cnn: fc,
probs; logreg: probs) so `lora.target_layers` can name them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from flq.errors import UsageError
from flq.learning.tfimport import keras

if TYPE_CHECKING:
    from flq.config import Config

MODELS: Final = ("logreg", "mlp", "cnn")
CNN_MIN_SIDE: Final = 4  # two 2x2 poolings need at least 4x4 inputs
_SEEDS_PER_MODEL: Final = 64  # layer seeds are seed * 64 + layer position; models have fewer layers

# keras ships no type information, so a model is typed as Any under this readable name.
KerasModel = Any


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden_units: int = 64,
    seed: int = 0,
) -> KerasModel:
    """A keras.Model named `name` taking `input_shape` and returning class probabilities."""
    if name not in MODELS:
        raise ValueError(f"model: got {name!r}, expected one of {list(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes: got {num_classes}, expected >= 2")
    if hidden_units < 1:
        raise ValueError(f"hidden_units: got {hidden_units}, expected >= 1")
    if name == "cnn":
        _check_image_shape(input_shape)
    k = keras()
    seeds = _LayerSeeds(seed)
    hidden = _HIDDEN_LAYERS[name](k, seeds, hidden_units)
    output = k.layers.Dense(
        num_classes, activation="softmax", dtype="float32", **seeds.kernel_init(k), name="probs"
    )
    return k.Sequential([k.Input(shape=input_shape), *hidden, output], name=name)


def count_parameters(model: KerasModel) -> int:
    return int(sum(int(weight.numpy().size) for weight in model.weights))


def _check_image_shape(input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or min(input_shape[:2]) < CNN_MIN_SIDE:
        raise ValueError(
            f"cnn: input shape {input_shape} is not an image (H, W, C) with H, W >= {CNN_MIN_SIDE}"
        )


class _LayerSeeds:
    """Hands out one distinct integer seed per layer, in build order."""

    def __init__(self, seed: int) -> None:
        self._next = seed * _SEEDS_PER_MODEL

    def kernel_init(self, k: Any) -> dict[str, Any]:
        self._next += 1
        return {"kernel_initializer": k.initializers.GlorotUniform(seed=self._next)}


def _logreg_layers(k: Any, seeds: _LayerSeeds, hidden_units: int) -> list[Any]:
    return [k.layers.Flatten()]


def _mlp_layers(k: Any, seeds: _LayerSeeds, hidden_units: int) -> list[Any]:
    return [
        k.layers.Flatten(),
        k.layers.Dense(hidden_units, activation="relu", **seeds.kernel_init(k), name="hidden"),
    ]


def _cnn_layers(k: Any, seeds: _LayerSeeds, hidden_units: int) -> list[Any]:
    """The original FLQ CNN (467,818 parameters on 28x28x1, 10 classes); hidden_units unused."""

    def conv(filters: int) -> Any:
        return k.layers.Conv2D(
            filters, 3, padding="same", activation="relu", **seeds.kernel_init(k)
        )

    return [
        conv(32),
        conv(32),
        k.layers.MaxPooling2D(2),
        conv(64),
        conv(64),
        k.layers.MaxPooling2D(2),
        k.layers.Flatten(),
        k.layers.Dense(128, activation="relu", **seeds.kernel_init(k), name="fc"),
    ]


_HIDDEN_LAYERS: Final[dict[str, Callable[[Any, _LayerSeeds, int], list[Any]]]] = {
    "logreg": _logreg_layers,
    "mlp": _mlp_layers,
    "cnn": _cnn_layers,
}


@dataclass(frozen=True)
class ModelRecipe:
    """How every node builds the same model: a built-in `name`, or the user's `builder`
    (flq/learning/plugins.py), then, if `weights` names a file, the weights from it."""

    name: str = "mlp"
    builder: str = ""  # "module:function" or "path/to/file.py:function"; wins over `name`
    hidden_units: int = 64
    seed: int = 0
    weights: str = ""  # .keras, .weights.h5 or .npz

    @classmethod
    def from_config(cls, cfg: Config, *, for_worker: bool = False) -> ModelRecipe:
        """The model every node builds, from the `model` section. Workers leave out the initial
        weights file (the first round brings them) unless LoRA keeps the base frozen on every
        node: then the base is never sent and each worker loads it itself."""
        model = cfg.model
        weights = model.weights if not for_worker or cfg.lora.rank > 0 else ""
        return cls(
            name=model.name,
            builder=model.builder,
            hidden_units=model.hidden_units,
            seed=cfg.system.seed,
            weights=weights,
        )

    @property
    def label(self) -> str:
        """How results, logs and Status name the model."""
        return self.builder or self.name

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> KerasModel:
        """The model (input_shape and num_classes shape only a built-in one)."""
        if self.builder:
            from flq.learning.plugins import build_user_model

            model = build_user_model(self.builder, seed=self.seed)
        else:
            model = build_model(
                self.name,
                input_shape,
                num_classes,
                hidden_units=self.hidden_units,
                seed=self.seed,
            )
        if self.weights:
            load_weights_file(model, self.weights)
        return model


def load_weights_file(model: KerasModel, path_text: str) -> None:
    """Set the model's weights from a .keras / .weights.h5 / .npz file, all or nothing
    (flq.learning.weights, which lora.base uses too); WeightsError names the key, the file and
    the first mismatch, and the model is left as it was."""
    from flq.learning.weights import WeightsFileError
    from flq.learning.weights import load_weights_file as load_all_or_nothing

    try:
        load_all_or_nothing(model, Path(path_text).expanduser())
    except WeightsFileError as error:
        raise WeightsError(f"model.weights = {path_text!r}: {error}") from error


class WeightsError(UsageError, ValueError):
    """An initial weights file that is missing, unreadable or of another model."""

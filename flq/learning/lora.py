"""LoRA-only federation: low-rank adapters on chosen Dense layers, everything else frozen.

With `lora.rank > 0` every node builds the same seeded model, loads the pretrained base
(`lora.base`, the same file on every node; without it the seeded random weights stay, on which
adapters learn little), adds adapters (Keras 3's `Dense.enable_lora`: kernel' = kernel +
alpha/rank * A @ B, B starting at zero) to the target Dense layers and freezes every other
variable, biases included. The base weights are then identical on every node without ever being
sent, and the weights the trainer and the master exchange — the
list the codec, the lazy rule, the budget and the aggregate work on — are the model's trainable
variables only, in `model.trainable_weights` order: the adapters. Without LoRA the exchanged list
is the whole model (`model.weights`), as before.

This module imports no TensorFlow at import time (flq.learning's rule); `apply_lora` and the
helpers take a built Keras model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from flq.learning.tfimport import keras
from flq.learning.weights import load_weights_file

if TYPE_CHECKING:
    from flq.config import Config

ALL_DENSE: Final = "all_dense"
_ADAPTER_SEED_OFFSET: Final = 32  # adapter seeds sit after the model's own layer seeds


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 0  # 0: LoRA off
    alpha: float = 0.0  # 0: alpha = rank (scale 1)
    target_layers: tuple[str, ...] = (ALL_DENSE,)
    base: str = ""  # weights file of the pretrained base; "": the seeded random base

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora rank: got {self.rank}, expected >= 0 (0 = off)")
        if self.alpha < 0:
            raise ValueError(f"lora alpha: got {self.alpha}, expected >= 0 (0 = rank)")
        if not self.target_layers:
            raise ValueError("lora target_layers: expected all_dense or at least one name")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale_alpha(self) -> float:
        return self.alpha or float(self.rank)

    @classmethod
    def parse(cls, rank: int, alpha: float, target_layers: str, base: str = "") -> LoraSpec:
        """From the config's `lora` section ("all_dense" or comma-separated names)."""
        names = tuple(name.strip() for name in target_layers.split(",") if name.strip())
        return cls(rank, alpha, names or (ALL_DENSE,), base)

    @classmethod
    def from_config(cls, cfg: Config) -> LoraSpec:
        lora = cfg.lora
        return cls.parse(lora.rank, lora.alpha, lora.target_layers, lora.base)


def apply_lora(model: Any, spec: LoraSpec, *, seed: int) -> list[str]:
    """Load the base (`spec.base`, if set), add adapters to the target Dense layers of a built
    model and freeze everything else. Returns the adapted layers' names. Seeded, so every node
    gets the same adapters."""
    if not spec.enabled:
        return []
    if spec.base:
        load_weights_file(model, spec.base)
    k = keras()
    dense = [layer for layer in model.layers if isinstance(layer, k.layers.Dense)]
    targets = _targets(dense, spec.target_layers)
    for layer in model.layers:
        if layer not in targets:
            layer.trainable = False
    for position, layer in enumerate(targets):
        _enable(layer, spec, seed * 64 + _ADAPTER_SEED_OFFSET + position)
        if layer.bias is not None:
            layer.bias.trainable = False
    return [layer.name for layer in targets]


def _targets(dense: list[Any], wanted: Sequence[str]) -> list[Any]:
    if not dense:
        raise ValueError("lora: the model has no Dense layer to adapt")
    if ALL_DENSE in wanted:
        return dense
    by_name = {layer.name: layer for layer in dense}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise ValueError(
            f"lora.target_layers: no Dense layer named {', '.join(unknown)}; "
            f"this model's Dense layers are {', '.join(by_name)} (or use {ALL_DENSE})"
        )
    return [by_name[name] for name in wanted]


def _enable(layer: Any, spec: LoraSpec, seed: int) -> None:
    enable = getattr(layer, "enable_lora", None)
    if enable is None:
        raise RuntimeError("LoRA needs Keras 3 (Dense.enable_lora); this Keras has none")
    k = keras()
    options: dict[str, Any] = {
        "a_initializer": k.initializers.HeUniform(seed=seed),
        "b_initializer": "zeros",
    }
    if "lora_alpha" in inspect.signature(enable).parameters:
        options["lora_alpha"] = spec.scale_alpha
    elif spec.scale_alpha != spec.rank:
        raise RuntimeError("lora.alpha needs Keras >= 3.8 (enable_lora(lora_alpha=...))")
    enable(spec.rank, **options)


# ---------------------------------------------------------------- the exchanged weights


def is_lora(model: Any) -> bool:
    return any(getattr(layer, "lora_enabled", False) for layer in model.layers)


def exchanged_variables(model: Any) -> list[Any]:
    """The variables that travel: the adapters with LoRA, else every weight of the model."""
    return list(model.trainable_weights if is_lora(model) else model.weights)


def get_exchanged(model: Any) -> list[np.ndarray]:
    return [np.asarray(v.numpy(), dtype=np.float32) for v in exchanged_variables(model)]


def set_exchanged(model: Any, arrays: Sequence[np.ndarray]) -> None:
    """Load the exchanged weights (shapes already checked: see trainer.as_model_weights)."""
    if not is_lora(model):
        model.set_weights(list(arrays))
        return
    for variable, array in zip(exchanged_variables(model), arrays, strict=True):
        variable.assign(array)


def frozen_weights(model: Any) -> list[np.ndarray]:
    """Everything that does not travel (with LoRA: the base model), for checks and tests."""
    moving = {id(v) for v in exchanged_variables(model)}
    return [np.asarray(v.numpy()) for v in model.weights if id(v) not in moving]


def penalised_variables(model: Any) -> list[Any]:
    """What the L2 term weighs: the kernels, or with LoRA the adapter matrices (a frozen kernel
    has no gradient, and LoRA's `kernel` is a merged tensor, not a variable)."""
    if is_lora(model):
        return [
            matrix
            for layer in model.layers
            if getattr(layer, "lora_enabled", False)
            for matrix in (layer.lora_kernel_a, layer.lora_kernel_b)
        ]
    return [layer.kernel for layer in model.layers if hasattr(layer, "kernel")]


def count_exchanged(model: Any) -> int:
    return int(sum(int(np.prod(v.shape)) for v in exchanged_variables(model)))


# ---------------------------------------------------------------- the full model again


@dataclass(frozen=True)
class MergeLayout:
    """How to turn exchanged adapters back into a plain model's weights, in numpy (thread-safe):
    the frozen base in model.get_weights() order of the model without adapters, and for each
    adapted kernel (base position, A's and B's exchanged positions, alpha / rank)."""

    base: tuple[np.ndarray, ...]
    merges: tuple[tuple[int, int, int, float], ...]

    def merged(self, exchanged: Sequence[np.ndarray]) -> list[np.ndarray]:
        weights = [w.copy() for w in self.base]
        for kernel, a, b, scale in self.merges:
            weights[kernel] += np.float32(scale) * (exchanged[a] @ exchanged[b])
        return weights


def merge_layout(model: Any) -> MergeLayout:
    """The layout of a model after `apply_lora` (its base values as they are now: frozen)."""
    exchanged = {id(v): i for i, v in enumerate(exchanged_variables(model))}
    base: list[np.ndarray] = []
    merges: list[tuple[int, int, int, float]] = []
    for layer in model.layers:
        adapted = getattr(layer, "lora_enabled", False)
        for variable in layer.weights:
            if id(variable) in exchanged:
                continue
            if adapted and variable is getattr(layer, "_kernel", None):
                a, b = exchanged[id(layer.lora_kernel_a)], exchanged[id(layer.lora_kernel_b)]
                scale = float(getattr(layer, "lora_alpha", layer.lora_rank)) / layer.lora_rank
                merges.append((len(base), a, b, scale))
            base.append(np.asarray(variable.numpy(), dtype=np.float32))
    return MergeLayout(tuple(base), tuple(merges))

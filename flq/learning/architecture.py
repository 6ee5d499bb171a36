"""A model's architecture as a short digest and a one-line description.

Every worker sends its digest in Hello and the master refuses a worker whose model differs from
its own (two nodes with different `model.builder` files would otherwise exchange weights that
only happen to have the same count, or fail deep inside a round). The digest covers what makes
weights exchangeable and meaningful: each layer's class in order and the shape of every weight,
plus the input and output shapes. Layer names are left out (Keras numbers them per process:
`dense` here is `dense_3` there) and so are dtypes (a board in mixed precision computes in
float16 with the same weights).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from flq.types import ModelIdentity

DIGEST_HEX: Final = 16  # 64 bits: enough to tell models apart, short enough to read
MAX_DESCRIPTION: Final = 200  # characters; it travels in Hello (serde allows 256)


def architecture_of(model: Any) -> ModelIdentity:
    """e.g. 3f0c…, "Sequential: Flatten, Dense x2; 4,810 parameters; (8, 8, 1) -> 10"."""
    layers = [_layer_entry(layer) for layer in model.layers]
    shapes = [list(w.shape) for w in model.weights]
    inputs, outputs = _shape(model, "input_shape"), _shape(model, "output_shape")
    canonical = json.dumps({"layers": layers, "in": inputs, "out": outputs}, sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_HEX]
    parameters = sum(_size(shape) for shape in shapes)
    kinds = ", ".join(_runs([type(layer).__name__ for layer in model.layers]))
    description = (
        f"{type(model).__name__}: {kinds}; {parameters:,} parameters; "
        f"{tuple(inputs[1:]) if inputs else '?'} -> {outputs[-1] if outputs else '?'}"
    )
    if len(description) > MAX_DESCRIPTION:
        description = description[: MAX_DESCRIPTION - 1] + "…"
    return ModelIdentity(digest, description)


def _layer_entry(layer: Any) -> dict[str, Any]:
    return {"class": type(layer).__name__, "weights": [list(w.shape) for w in layer.weights]}


def _shape(model: Any, attribute: str) -> list[Any]:
    try:
        shape = getattr(model, attribute)
    except (AttributeError, ValueError):  # a subclassed model may not know its shapes
        return []
    return list(shape) if isinstance(shape, tuple) else []


def _size(shape: list[int]) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


def _runs(names: list[str]) -> list[str]:
    """Conv2D, Conv2D, Dense -> Conv2D x2, Dense."""
    runs: list[str] = []
    count = 0
    for position, name in enumerate(names):
        count += 1
        if position + 1 == len(names) or names[position + 1] != name:
            runs.append(name if count == 1 else f"{name} x{count}")
            count = 0
    return runs

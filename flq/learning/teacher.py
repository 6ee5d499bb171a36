"""A teacher for knowledge fusion, trained on the master's own share of the data.

`flq demo --fusion ...` and the fusion benchmark need a teacher the federation does not have: a
wider model than the federated one, trained centrally on the server's held-out share
(`fusion.server_share`, the same split the master fuses on and the workers never see), saved as a
Keras file for `fusion.teacher`. Users with their own teacher point `fusion.teacher` at its file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from flq.learning.data import ArrayData, load_dataset
from flq.learning.models import KerasModel, count_parameters
from flq.learning.partition import split_server_share
from flq.learning.tfimport import keras, tf

CNN_MIN_SIDE: Final = 4


@dataclass(frozen=True)
class TeacherReport:
    path: str
    dataset: str
    server_samples: int
    parameters: int
    epochs: int
    test_accuracy: float
    seconds: float


def build_teacher(
    input_shape: tuple[int, ...], num_classes: int, *, width: int = 48, seed: int = 0
) -> KerasModel:
    """A wider CNN than the federated one for images (two conv blocks of `width` and 2x`width`
    filters, a 256-unit Dense layer named fc), a 256-unit MLP otherwise; softmax output `probs`."""
    k = keras()
    init = k.initializers.GlorotUniform
    layers: list[Any] = []
    if len(input_shape) == 3 and min(input_shape[:2]) >= CNN_MIN_SIDE:
        for block, filters in enumerate((width, 2 * width)):
            for conv in range(2):
                layers.append(
                    k.layers.Conv2D(
                        filters,
                        3,
                        padding="same",
                        activation="relu",
                        kernel_initializer=init(seed=seed * 64 + 2 * block + conv),
                    )
                )
            layers.append(k.layers.MaxPooling2D(2))
    layers += [
        k.layers.Flatten(),
        k.layers.Dropout(0.3, seed=seed),
        k.layers.Dense(
            256, activation="relu", kernel_initializer=init(seed=seed * 64 + 8), name="fc"
        ),
        k.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer=init(seed=seed * 64 + 9),
            name="probs",
        ),
    ]
    return k.Sequential([k.Input(shape=input_shape), *layers], name="teacher")


def train_teacher(
    out: Path,
    *,
    dataset: str,
    data_dir: str = "",
    server_share: float,
    seed: int = 0,
    test_fraction: float = 0.25,
    epochs: int = 10,
    width: int = 48,
) -> TeacherReport:
    """Train a teacher on the server's share of `dataset`, save it to `out` (.keras) with a
    `<out>.json` report beside it, and return the report (its accuracy on the test split)."""
    import time

    spec, train, test = load_dataset(dataset, data_dir, test_fraction=test_fraction, seed=seed)
    server, _ = split_server_share(train, server_share, seed)
    if len(server) == 0:
        raise ValueError(f"server_share: got {server_share}, the teacher needs a share > 0")
    tf().random.set_seed(seed)
    model = build_teacher(spec.input_shape, spec.num_classes, width=width, seed=seed)
    model.compile(
        optimizer=keras().optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    began = time.perf_counter()
    model.fit(server.x, server.y, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    seconds = time.perf_counter() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    report = TeacherReport(
        path=str(out),
        dataset=dataset,
        server_samples=len(server),
        parameters=count_parameters(model),
        epochs=epochs,
        test_accuracy=_accuracy(model, test),
        seconds=round(seconds, 1),
    )
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def save_model(model: KerasModel, path: Path) -> None:
    """model.save, without the DeprecationWarning Keras' saver trips in numpy 2 (not ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model.save(path)


def _accuracy(model: KerasModel, data: ArrayData) -> float:
    _, accuracy = model.evaluate(data.x, data.y, batch_size=512, verbose=0)
    return float(accuracy)

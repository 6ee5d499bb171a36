"""Weights files: load a user's file into a built Keras model, and write a model out as files.

Loading (`load_weights_file`) serves `lora.base` (the pretrained base LoRA adapters sit on) and
any other "start from these weights" setting. It is all or nothing: the file's arrays are read
into a clone of the model (Keras' `load_weights` assigns layer by layer and stops at the first
misfit, leaving a half-loaded model behind), checked against the model's shapes, and only then
copied in. Formats:
- `.keras` and `.weights.h5`: Keras' own files (`model.save`, `model.save_weights`);
- `.npz`: FLQ's model file (`model.npz` of a run, `flq model pull -o x.npz`: arrays `weights/0..`),
  or plain `numpy.savez(path, *model.get_weights())` (arrays `arr_0..`).

Writing (`write_keras`) is the `.keras` half of the final model a master leaves in its results
directory; the `.npz` half is numpy only (flq.master.bookkeeper).
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from flq.config import WEIGHTS_SUFFIXES
from flq.errors import UsageError
from flq.learning.tfimport import keras

_FLQ_KEY: Final = "weights/{}"  # FLQ's model file (a checkpoint-format .npz)
_SAVEZ_KEY: Final = "arr_{}"  # numpy.savez(path, *arrays)


class WeightsFileError(UsageError, ValueError):
    """A weights file that is missing, unreadable or of another model; names the file."""


def load_weights_file(model: Any, path: str | Path) -> None:
    """Set `model`'s weights from the file at `path`; on any problem raise WeightsFileError and
    leave the model as it was."""
    source = Path(path)
    if not source.is_file():
        raise WeightsFileError(f"{source}: no such weights file")
    arrays = read_weights_file(model, source)
    expected = [tuple(w.shape) for w in model.weights]
    found = [tuple(a.shape) for a in arrays]
    if found != expected:
        raise WeightsFileError(f"{source}: {_misfit(found, expected)} (model {model.name})")
    model.set_weights(arrays)


def read_weights_file(model: Any, source: Path) -> list[np.ndarray]:
    """The file's arrays in `model.get_weights()` order (a .keras/.h5 file is read through a
    clone of `model`, whose layer structure it must match)."""
    name = source.name.lower()
    if name.endswith(".npz"):
        return _read_npz(source)
    if name.endswith((".keras", ".weights.h5")):
        return _read_keras(model, source)
    raise WeightsFileError(f"{source}: expected a file ending in {', '.join(WEIGHTS_SUFFIXES)}")


def _read_keras(model: Any, source: Path) -> list[np.ndarray]:
    clone = keras().models.clone_model(model)
    try:
        clone.load_weights(source)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise WeightsFileError(
            f"{source}: cannot load it into model {model.name}: {first_line}"
        ) from None
    return [np.asarray(w, dtype=np.float32) for w in clone.get_weights()]


def _read_npz(source: Path) -> list[np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as archive:
            files = set(archive.files)
            for key in (_FLQ_KEY, _SAVEZ_KEY):
                count = _run_length(files, key)
                if count:
                    return [np.asarray(archive[key.format(i)], np.float32) for i in range(count)]
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise WeightsFileError(f"{source}: cannot read it as .npz ({error})") from None
    raise WeightsFileError(
        f"{source}: no weight arrays in it (expected weights/0.. as FLQ writes them, "
        "or arr_0.. from numpy.savez(path, *model.get_weights()))"
    )


def _run_length(files: set[str], key: str) -> int:
    count = 0
    while key.format(count) in files:
        count += 1
    return count


def _misfit(found: Sequence[tuple[int, ...]], expected: Sequence[tuple[int, ...]]) -> str:
    if len(found) != len(expected):
        return f"holds {len(found)} weight arrays, the model has {len(expected)}"
    position = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
    return f"weight {position} has shape {found[position]}, the model's is {expected[position]}"


def write_keras(model: Any, weights: Sequence[np.ndarray], path: Path) -> None:
    """Save `model` with `weights` (in model.get_weights() order) as a .keras file, whole or
    not at all: written beside it, then renamed over it."""
    model.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    partial = path.with_name(f".{path.stem}.partial.keras")  # keras wants the suffix
    try:
        with warnings.catch_warnings():
            # TensorFlow's tensors predate numpy 2's __array__(copy=...); keras' saver trips.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

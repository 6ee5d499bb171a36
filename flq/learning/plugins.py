"""Users' own code named in the config: a model builder and a data loader.

Both are written `"module:function"` (an importable module) or `"path/to/file.py:function"` (a
file, relative to the working directory). `resolve_callable` turns such a spec into the function;
`build_user_model` and `load_user_data` call it the way FLQ promises and check what comes back, so
a wrong return is reported naming the spec, never deep inside training. Other parts (a teacher
model, server-side data) call the same three functions.

- A builder is called with no arguments and returns an uncompiled `keras.Model` whose output is
  class probabilities (softmax); FLQ adds its own optimiser and loss.
- A loader returns `(x_train, y_train), (x_test, y_test)` numpy arrays like
  `keras.datasets.mnist.load_data()`. If it takes a `worker_index` argument it is called as
  `load(worker_index=i, num_workers=n)` and returns worker i's own share (each board reads its own
  files); the master calls it with `worker_index=None` for the test part. A loader without that
  argument returns the full set, which FLQ partitions with `dataset.partition`.

No TensorFlow at import (flq.learning's rule); `build_user_model` imports Keras when it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from flq.errors import UsageError
from flq.learning.data import BYTE_MAX_PIXEL, ArrayData

WORKER_INDEX_ARG: Final = "worker_index"
_FILE_MODULE_PREFIX: Final = "flq_user_"
_LABELS_COLUMN_NDIM: Final = 2  # (n, 1) labels, as keras.datasets.cifar10 returns them


class PluginError(UsageError, ValueError):
    """A model builder or data loader named in the config cannot be used; the message names the
    config key, the spec and what is wrong."""


def parse_spec(spec: str, what: str) -> tuple[str, str]:
    """("module or file", "function") of a spec; PluginError when it has no `:function`."""
    target, colon, attribute = spec.strip().rpartition(":")
    if not colon or not target or not attribute:
        raise PluginError(
            f"{what} = {spec!r}: expected 'module:function' or 'path/to/file.py:function'"
        )
    return target, attribute


def resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function a spec names, imported; `what` is the config key, for messages."""
    target, attribute = parse_spec(spec, what)
    module = _import_file(target, spec, what) if _is_file(target) else _import(target, spec, what)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            defined = sorted(
                name
                for name, value in vars(module).items()
                if callable(value) and not name.startswith("_")
            )
            raise PluginError(
                f"{what} = {spec!r}: {target} has no {attribute!r} "
                f"(its functions: {', '.join(defined) or 'none'})"
            )
        found = getattr(found, part)
    if not callable(found):
        raise PluginError(
            f"{what} = {spec!r}: {attribute} is a {type(found).__name__}, not a function"
        )
    return found  # type: ignore[no-any-return]


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target


def _import(name: str, spec: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise PluginError(f"{what} = {spec!r}: cannot import {name!r} ({error})") from error


def _import_file(target: str, spec: str, what: str) -> Any:
    path = Path(target).expanduser()
    if not path.is_file():
        raise PluginError(
            f"{what} = {spec!r}: {path} not found "
            f"(relative paths are read from the working directory, {Path.cwd()})"
        )
    path = path.resolve()
    # One module per file and process: the builder and the loader in one file share it.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"{_FILE_MODULE_PREFIX}{path.stem.replace('-', '_')}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise PluginError(f"{what} = {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    # As when the file runs as a script: it may import modules that sit beside it.
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise PluginError(
            f"{what} = {spec!r}: importing {path} failed: {type(error).__name__}: {error}"
        ) from error
    return module


# ---------------------------------------------------------------- model builders


def build_user_model(spec: str, *, seed: int = 0, what: str = "model.builder") -> Any:
    """Call the builder `spec` names (`build()`) and check it returned a built keras.Model.

    The global random seed is set first, so a builder that leaves its initialisers unseeded still
    builds the same weights in every process (LoRA's frozen base relies on that)."""
    from flq.learning.tfimport import keras

    build = resolve_callable(spec, what)
    k = keras()
    k.utils.set_random_seed(seed)
    try:
        model = build()
    except Exception as error:
        raise PluginError(
            f"{what} = {spec!r}: build() failed: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, k.Model):
        raise PluginError(
            f"{what} = {spec!r}: build() returned {type(model).__name__}, expected a keras.Model"
        )
    if not model.built or not model.weights:
        raise PluginError(
            f"{what} = {spec!r}: the model is not built (give it an input shape, "
            "e.g. keras.Input(shape=(28, 28, 1)) as its first layer)"
        )
    output = tuple(model.output_shape) if hasattr(model, "output_shape") else ()
    if len(output) != 2 or not isinstance(output[1], int) or output[1] < 2:
        raise PluginError(
            f"{what} = {spec!r}: the model's output has shape {output}; FLQ trains classifiers "
            "and expects (batch, classes) probabilities with at least 2 classes"
        )
    return model


# ---------------------------------------------------------------- data loaders


@dataclass(frozen=True)
class DataSource:
    """Where a node's data comes from: a loader and whether it serves per-worker shares."""

    name: str  # how messages name it: the spec, or the built-in set's name
    load: Callable[..., Any]
    per_worker: bool  # load(worker_index=i, num_workers=n) returns worker i's own share
    what: str = "dataset.loader"  # the config key behind it

    def split(self, worker_index: int | None, num_workers: int) -> tuple[ArrayData, ArrayData]:
        """(train, test) as the loader returns them, checked: for worker `worker_index` (its
        share, or the full set for FLQ to partition), or for the master (None)."""
        if self.per_worker:
            returned = self.load(**{WORKER_INDEX_ARG: worker_index, "num_workers": num_workers})
        else:
            returned = self.load()
        return _checked_split(returned, self.what, self.name, need_train=worker_index is not None)


def user_data_source(spec: str, what: str = "dataset.loader") -> DataSource:
    """The loader a spec names, with whether it takes `worker_index` (then it serves shares)."""
    load = resolve_callable(spec, what)
    return DataSource(
        name=spec, load=_reported(load, spec, what), per_worker=_takes_worker_index(load), what=what
    )


def load_user_data(
    spec: str, worker_index: int | None = None, num_workers: int = 1, what: str = "dataset.loader"
) -> tuple[ArrayData, ArrayData]:
    """(train, test) from the loader `spec` names, called as FLQ calls it."""
    return user_data_source(spec, what).split(worker_index, num_workers)


def _takes_worker_index(load: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(load).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call them bare
        return False
    return any(
        p.name == WORKER_INDEX_ARG or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def _reported(load: Callable[..., Any], spec: str, what: str) -> Callable[..., Any]:
    def call(**kwargs: Any) -> Any:
        try:
            return load(**kwargs)
        except PluginError:
            raise
        except Exception as error:
            args = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
            raise PluginError(
                f"{what} = {spec!r}: load({args}) failed: {type(error).__name__}: {error}"
            ) from error

    return call


def _checked_split(
    returned: Any, what: str, name: str, *, need_train: bool
) -> tuple[ArrayData, ArrayData]:
    where = f"{what} = {name!r}"
    try:
        (x_train, y_train), (x_test, y_test) = returned
    except (TypeError, ValueError):
        raise PluginError(
            f"{where}: returned {type(returned).__name__}, expected "
            "((x_train, y_train), (x_test, y_test))"
        ) from None
    train = _checked_arrays(x_train, y_train, f"{where}: train")
    test = _checked_arrays(x_test, y_test, f"{where}: test")
    if need_train and len(train) == 0:
        raise PluginError(f"{where}: no training samples for this worker")
    if not need_train and len(test) == 0:
        raise PluginError(f"{where}: no test samples for the master to evaluate on")
    if len(train) and len(test) and train.x.shape[1:] != test.x.shape[1:]:
        raise PluginError(
            f"{where}: x_train samples have shape {train.x.shape[1:]}, x_test {test.x.shape[1:]}"
        )
    return train, test


def _checked_arrays(x: Any, y: Any, where: str) -> ArrayData:
    """float32 samples (uint8 scaled to [0, 1], as FLQ's own sets) and int64 class labels."""
    samples, labels = np.asarray(x), np.asarray(y)
    if samples.dtype == np.uint8:
        samples = np.multiply(samples, np.float32(1.0 / BYTE_MAX_PIXEL), dtype=np.float32)
    elif np.issubdtype(samples.dtype, np.number) and not np.iscomplexobj(samples):
        samples = samples.astype(np.float32, copy=False)
    else:
        raise PluginError(f"{where}: x has dtype {samples.dtype}, expected numbers")
    if labels.ndim == _LABELS_COLUMN_NDIM and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PluginError(
            f"{where}: y has shape {labels.shape} and dtype {labels.dtype}; expected a 1-D "
            "array of integer class labels"
        )
    if labels.size and labels.min() < 0:
        raise PluginError(f"{where}: y holds the negative label {int(labels.min())}")
    count = samples.shape[0] if samples.ndim else 0
    if samples.ndim < 1 or count != labels.shape[0]:
        raise PluginError(f"{where}: {count} samples but {labels.shape[0]} labels")
    if samples.size and not np.isfinite(samples).all():
        raise PluginError(f"{where}: x holds NaN or infinite values")
    return ArrayData(samples, labels.astype(np.int64, copy=False))

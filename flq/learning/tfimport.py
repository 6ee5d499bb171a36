"""The one door to TensorFlow and Keras: imported on first use, never at module import.

`import flq.learning` must stay cheap (TF costs 3–5 s and ~560 MB), so every module here calls
`tf()` / `keras()` inside the functions that need them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Final

QUIET_TF_ENV: Final = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
KERAS_BACKEND: Final = "tensorflow"


def quiet_tensorflow_env() -> None:
    """Quiet TensorFlow's C++ logs and oneDNN banner unless the user already chose otherwise.

    Only effective before TensorFlow is first imported; `tf()` calls it for that reason.
    """
    for key, value in QUIET_TF_ENV.items():
        os.environ.setdefault(key, value)


def tf() -> ModuleType:
    quiet_tensorflow_env()
    return importlib.import_module("tensorflow")


def keras() -> ModuleType:
    """Keras on the TensorFlow backend (our training step is TensorFlow code)."""
    quiet_tensorflow_env()
    os.environ.setdefault("KERAS_BACKEND", KERAS_BACKEND)
    keras_module = importlib.import_module("keras")
    backend = keras_module.backend.backend()
    if backend != KERAS_BACKEND:
        raise RuntimeError(
            f"Keras runs on the {backend!r} backend; FLQ needs KERAS_BACKEND={KERAS_BACKEND}"
        )
    return keras_module

"""Fixtures the unit and integration suites share (one copy each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flq import serde
from flq.types import RoundStart


@pytest.fixture(scope="session")
def digits() -> Any:
    """scikit-learn's digits, split as the federation splits them: (spec, train, test)."""
    from flq.learning.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the master's certificate for 127.0.0.1, workers w0..w2, the admin, every token."""
    from flq.certs import init_directory

    directory = tmp_path_factory.mktemp("certs")
    init_directory(directory, "127.0.0.1", ["w0", "w1", "w2"])
    return directory


@pytest.fixture
def round_start_conversions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The round of every RoundStart converted to protobuf (the downlink's costliest copy)."""
    converted: list[int] = []
    real = serde.master_message_to_proto

    def counting(message: Any) -> Any:
        if isinstance(message, RoundStart):
            converted.append(message.round)
        return real(message)

    monkeypatch.setattr(serde, "master_message_to_proto", counting)
    yield converted

"""Fixtures the unit and integration suites share (one copy each), and the markers for tests
that need more than a plain checkout."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flq import serde
from flq.types import RoundStart

ROOT = Path(__file__).resolve().parents[1]
# `make test` sets it: there a missing resource fails its test instead of skipping it.
REQUIRE_ALL_ENV = "FLQ_REQUIRE_ALL"


def _proto_venv_present() -> bool:
    default = ROOT / ".venv-proto" / "bin" / "python"
    return Path(os.environ.get("FLQ_PROTO_PYTHON", str(default))).exists()


def _system_deps_present() -> bool:
    from flq.learning.data import DEFAULT_DIRS

    return Path(DEFAULT_DIRS["fashion-mnist"]).is_dir()


def _container_tools_present() -> bool:
    import shutil

    return all(shutil.which(tool) for tool in ("podman", "runc", "mmdebstrap"))


# marker -> (is the resource here?, how to get it)
RESOURCES: dict[str, tuple[Callable[[], bool], str]] = {
    "proto_venv": (_proto_venv_present, "run `make proto`"),
    "system_deps": (_system_deps_present, "run `sudo make system-deps`"),
    "containers": (_container_tools_present, "run `sudo make test-containers`"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a plain checkout, tests whose resource is missing are skipped with the way to get it;
    under `make test` (FLQ_REQUIRE_ALL=1) they run and fail loudly instead."""
    if os.environ.get(REQUIRE_ALL_ENV):
        return
    missing = {name: how for name, (present, how) in RESOURCES.items() if not present()}
    for item in items:
        for name, how in missing.items():
            if name in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"{name} missing: {how}"))


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

"""Users' own loaders and builders named in the config: resolving the spec, calling the loader the
way FLQ promises, checking what comes back, and the built-in sets as loaders of the same kind."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flq.config import ConfigError, DatasetConfig, config_from_dict
from flq.learning.plugins import PluginError, load_user_data, resolve_callable, user_data_source
from flq.learning.sources import data_source, master_data, worker_data


def _write(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


SHARE_LOADER = """
    import numpy as np

    calls = []

    def load(worker_index=None, num_workers=1):
        calls.append((worker_index, num_workers))
        rng = np.random.default_rng(0 if worker_index is None else worker_index + 1)
        count = 0 if worker_index is None else 10 + worker_index
        train = (rng.integers(0, 256, (count, 4, 4), dtype=np.uint8), np.arange(count) % 3)
        test = (rng.random((6, 4, 4)), np.array([[0], [1], [2], [0], [1], [2]]))
        return train, test

    def full():
        x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) / 120
        return (x, np.arange(40) % 4), (x[:8], np.arange(8) % 4)

    not_a_function = 3
"""


def test_a_file_loader_taking_worker_index_serves_each_worker_its_own_share(
    tmp_path: Path,
) -> None:
    spec = f"{_write(tmp_path, 'shares.py', SHARE_LOADER)}:load"
    source = user_data_source(spec)
    assert source.per_worker
    train, test = source.split(2, 5)
    assert len(train) == 12 and len(test) == 6
    # uint8 images are scaled as FLQ's own sets are; (n, 1) labels become (n,)
    assert train.x.dtype == np.float32 and train.x.min() >= 0.0 and train.x.max() <= 1.0
    assert test.y.shape == (6,) and test.y.dtype == np.int64
    # one module per file: the call went to the same module the second resolve sees
    module_calls = resolve_callable(f"{tmp_path / 'shares.py'}:load", "x").__globals__["calls"]
    assert module_calls == [(2, 5)]


def test_a_share_loader_is_not_partitioned_again(tmp_path: Path) -> None:
    spec = f"{_write(tmp_path, 'shares.py', SHARE_LOADER)}:load"
    dataset = DatasetConfig(loader=spec, partition="shards")
    source = data_source(dataset, seed=0)
    spec_seen, train = worker_data(source, dataset, index=1, num_workers=3, seed=0)
    assert len(train) == 11  # exactly what the loader returned for worker 1
    assert spec_seen.input_shape == (4, 4) and spec_seen.num_classes == 3
    _, test = master_data(source, dataset, num_workers=3)
    assert len(test) == 6


def test_a_full_set_loader_is_partitioned_by_flq(tmp_path: Path) -> None:
    spec = f"{_write(tmp_path, 'shares.py', SHARE_LOADER)}:full"
    dataset = DatasetConfig(loader=spec, partition="iid")
    source = data_source(dataset, seed=0)
    assert not source.per_worker
    parts = [worker_data(source, dataset, index=i, num_workers=4, seed=0)[1] for i in range(4)]
    assert [len(part) for part in parts] == [10, 10, 10, 10]
    seen = np.concatenate([part.x[:, 0] for part in parts])
    assert np.unique(seen).size == 40  # disjoint, and together the whole set


def test_a_module_loader_resolves_by_import_path() -> None:
    # any importable module works: here FLQ's own test helpers' sibling module of numpy
    load = resolve_callable("numpy.random:default_rng", "dataset.loader")
    assert load is np.random.default_rng


def test_builtin_sets_are_loaders_of_the_same_kind() -> None:
    dataset = DatasetConfig(name="digits")
    source = data_source(dataset, seed=0)
    assert not source.per_worker and source.name == "digits"
    spec, train = worker_data(source, dataset, index=0, num_workers=2, seed=0)
    assert spec.input_shape == (8, 8, 1) and spec.num_classes == 10
    _, test = master_data(source, dataset, num_workers=2)
    assert len(train) + len(test) > 1000


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_colon", "expected 'module:function'"),
        ("{dir}/missing.py:load", "missing.py not found (relative paths are read from"),
        ("{dir}/shares.py:absent", "has no 'absent' (its functions: full, load)"),
        ("{dir}/shares.py:not_a_function", "not_a_function is a int, not a function"),
        ("no_such_module_flq:load", "cannot import 'no_such_module_flq'"),
        ("{dir}/broken.py:load", "importing"),
    ],
)
def test_a_spec_that_does_not_resolve_names_the_key_the_spec_and_why(
    tmp_path: Path, spec: str, expected: str
) -> None:
    _write(tmp_path, "shares.py", SHARE_LOADER)
    _write(tmp_path, "broken.py", "raise RuntimeError('boom at import')\n")
    spec = spec.format(dir=tmp_path)
    with pytest.raises(PluginError) as error:
        resolve_callable(spec, "dataset.loader")
    message = str(error.value)
    assert message.startswith(f"dataset.loader = {spec!r}: ")
    assert expected in message


BAD_LOADERS = """
    import numpy as np

    def flat(worker_index=None, num_workers=1):
        return np.zeros((3, 2))

    def floats_as_labels(worker_index=None, num_workers=1):
        return (np.zeros((3, 2)), np.array([0.5, 1.0, 2.0])), (np.zeros((1, 2)), np.array([0]))

    def counts_differ(worker_index=None, num_workers=1):
        return (np.zeros((3, 2)), np.array([0, 1])), (np.zeros((1, 2)), np.array([0]))

    def nan(worker_index=None, num_workers=1):
        return (np.full((2, 2), np.nan), np.array([0, 1])), (np.zeros((1, 2)), np.array([0]))

    def empty_share(worker_index=None, num_workers=1):
        return (np.zeros((0, 2)), np.zeros(0, int)), (np.zeros((1, 2)), np.array([0]))

    def raises(worker_index=None, num_workers=1):
        raise FileNotFoundError("/data/board-7/train.csv")
"""


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("flat", "returned ndarray, expected ((x_train, y_train), (x_test, y_test))"),
        ("floats_as_labels", "train: y has shape (3,) and dtype float64; expected a 1-D"),
        ("counts_differ", "train: 3 samples but 2 labels"),
        ("nan", "train: x holds NaN or infinite values"),
        ("empty_share", "no training samples for this worker"),
        ("raises", "load(worker_index=0, num_workers=2) failed: FileNotFoundError"),
    ],
)
def test_what_a_loader_returns_is_checked_and_named(
    tmp_path: Path, function: str, expected: str
) -> None:
    spec = f"{_write(tmp_path, 'bad.py', BAD_LOADERS)}:{function}"
    with pytest.raises(PluginError) as error:
        load_user_data(spec, worker_index=0, num_workers=2)
    assert expected in str(error.value)
    assert repr(spec) in str(error.value)


def test_the_original_flq_values_load_as_their_canonical_choices() -> None:
    cfg = config_from_dict({"dataset": {"name": "fmnist", "partition": "non_iid"}})
    assert cfg.dataset.name == "fashion-mnist"
    assert cfg.dataset.partition == "dirichlet"
    with pytest.raises(ConfigError) as error:
        config_from_dict({"dataset": {"name": "fmnistt"}})
    assert "did you mean 'fashion-mnist'" in str(error.value)


def test_only_a_builder_and_a_loader_make_a_valid_config() -> None:
    cfg = config_from_dict(
        {"model": {"builder": "net.py:build"}, "dataset": {"loader": "data.py:load"}}
    )
    assert cfg.model.label == "net.py:build" and cfg.dataset.label == "data.py:load"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"dataset": {"loader": "load"}}, 'dataset.loader = "load" is invalid: expected'),
        ({"model": {"weights": "base.h5"}}, "expected a file ending in .keras, .weights.h5, .npz"),
        (
            {"dataset": {"name": "synthetic", "loader": "d.py:load"}},
            "the synthetic problem brings its own data",
        ),
        (
            {"dataset": {"name": "synthetic"}, "model": {"builder": "m.py:build"}},
            'model.builder with dataset.name = "synthetic"',
        ),
    ],
)
def test_user_code_keys_are_checked_when_the_config_loads(
    data: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(data)
    assert expected in str(error.value)

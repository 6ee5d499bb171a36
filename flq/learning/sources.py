"""Where a node's data comes from, whatever the config names: one kind of loader for all.

A built-in set (`dataset.name`) is a loader that returns the full set; a user's loader
(`dataset.loader`, flq/learning/plugins.py) returns the full set or, when it takes `worker_index`,
the worker's own share. A worker's training data is its share as returned, or its part of the full
set cut by FLQ's partitioner (`dataset.partition`); the master evaluates on the test part.
numpy only: no TensorFlow here.
"""

from __future__ import annotations

from flq.config import DatasetConfig
from flq.learning.data import ArrayData, DatasetSpec, load_dataset
from flq.learning.partition import partition_indices, split_server_share
from flq.learning.plugins import DataSource, user_data_source


def data_source(dataset: DatasetConfig, seed: int) -> DataSource:
    """The loader `dataset.loader` names, else the built-in set `dataset.name` as a loader."""
    if dataset.loader:
        return user_data_source(dataset.loader)

    def load_builtin() -> tuple[tuple[object, object], tuple[object, object]]:
        _, train, test = load_dataset(
            dataset.name, dataset.data_dir, test_fraction=dataset.test_fraction, seed=seed
        )
        return (train.x, train.y), (test.x, test.y)

    return DataSource(name=dataset.name, load=load_builtin, per_worker=False, what="dataset.name")


def worker_data(
    source: DataSource,
    dataset: DatasetConfig,
    *,
    index: int,
    num_workers: int,
    seed: int,
    server_share: float = 0.0,
) -> tuple[DatasetSpec, ArrayData]:
    """Worker `index`'s training samples (its own copy) and the spec of the data it sees. From a
    full set, the master's held-out `server_share` (fusion) is never a worker's."""
    if not 0 <= index < num_workers:
        raise ValueError(f"index: got {index}, expected 0..{num_workers - 1}")
    train, test = source.split(index, num_workers)
    spec = data_spec(source.name, train, test, dataset.num_classes)
    if source.per_worker:
        return spec, train
    _, train = split_server_share(train, server_share, seed)
    parts = partition_indices(
        train.y,
        num_workers,
        dataset.partition,
        dir_alpha=dataset.dir_alpha,
        shards_per_worker=dataset.shards_per_worker,
        seed=seed,
    )
    return spec, train.subset(parts[index])


def master_data(
    source: DataSource, dataset: DatasetConfig, *, num_workers: int
) -> tuple[DatasetSpec, ArrayData]:
    """The test samples the master evaluates on, and their spec."""
    train, test = source.split(None, num_workers)
    return data_spec(source.name, train, test, dataset.num_classes), test


def data_spec(name: str, train: ArrayData, test: ArrayData, num_classes: int = 0) -> DatasetSpec:
    """Input shape and class count; `num_classes` 0 = one more than the largest label seen."""
    seen = max(int(train.y.max(initial=0)), int(test.y.max(initial=0))) + 1
    if num_classes and seen > num_classes:
        raise ValueError(
            f"{name}: labels go up to {seen - 1}, but dataset.num_classes is {num_classes}"
        )
    sample = train if len(train) else test
    return DatasetSpec(
        name=name,
        input_shape=tuple(int(d) for d in sample.x.shape[1:]),
        num_classes=num_classes or seen,
    )

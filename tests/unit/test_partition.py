"""Partitioning a training set across workers: properties of every scheme, and worker ids."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flq.learning.data import ArrayData, load_dataset
from flq.learning.partition import (
    MIN_SAMPLES,
    SCHEMES,
    load_worker_partition,
    partition_indices,
    worker_index,
)


@st.composite
def partition_cases(draw: st.DrawFn) -> tuple[np.ndarray, int, str, float, int, int]:
    num_classes = draw(st.integers(1, 10))
    n = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    num_workers = draw(st.integers(1, min(n, 25)))
    scheme = draw(st.sampled_from(SCHEMES))
    alpha = draw(st.sampled_from([0.01, 0.1, 0.5, 10.0]))
    shards_per_worker = draw(st.integers(1, max(1, min(4, n // num_workers))))
    return labels, num_workers, scheme, alpha, shards_per_worker, seed


def _split(case: tuple[np.ndarray, int, str, float, int, int]) -> list[np.ndarray]:
    labels, num_workers, scheme, alpha, shards_per_worker, seed = case
    return partition_indices(
        labels,
        num_workers,
        scheme,
        dir_alpha=alpha,
        shards_per_worker=shards_per_worker,
        seed=seed,
    )


@settings(max_examples=150, deadline=None)
@given(partition_cases())
def test_parts_are_disjoint_cover_everything_and_are_deterministic(
    case: tuple[np.ndarray, int, str, float, int, int],
) -> None:
    parts = _split(case)
    labels, num_workers = case[0], case[1]
    assert len(parts) == num_workers
    everything = np.concatenate(parts)
    assert everything.dtype == np.int64
    assert np.array_equal(np.sort(everything), np.arange(labels.size))  # disjoint and complete
    again = _split(case)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=100, deadline=None)
@given(partition_cases())
def test_every_worker_gets_samples(case: tuple[np.ndarray, int, str, float, int, int]) -> None:
    labels, num_workers, scheme = case[0], case[1], case[2]
    sizes = [part.size for part in _split(case)]
    if scheme == "dirichlet":
        assert min(sizes) >= min(MIN_SAMPLES, labels.size // num_workers)
    else:
        assert min(sizes) >= 1


def test_iid_parts_differ_in_size_by_at_most_one_and_change_with_the_seed() -> None:
    labels = np.zeros(103, dtype=np.int64)
    parts = partition_indices(labels, 10, "iid", seed=0)
    sizes = [part.size for part in parts]
    assert max(sizes) - min(sizes) <= 1
    other = partition_indices(labels, 10, "iid", seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _mean_top_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    shares = [np.bincount(labels[part]).max() / part.size for part in parts]
    return float(np.mean(shares))


def test_small_dirichlet_alpha_skews_label_distributions() -> None:
    labels = np.repeat(np.arange(10), 500)
    skewed = partition_indices(labels, 10, "dirichlet", dir_alpha=0.05, seed=0)
    even = partition_indices(labels, 10, "dirichlet", dir_alpha=100.0, seed=0)
    # With 10 balanced classes an unskewed worker's most common class holds ~10%.
    assert _mean_top_class_share(skewed, labels) > 0.6
    assert _mean_top_class_share(even, labels) < 0.2


def test_tiny_alpha_still_leaves_every_worker_enough_samples() -> None:
    labels = np.repeat(np.arange(3), 100)
    parts = partition_indices(labels, 20, "dirichlet", dir_alpha=0.001, seed=4)
    assert min(part.size for part in parts) >= min(MIN_SAMPLES, 300 // 20)


def test_shards_give_each_worker_at_most_its_shard_count_of_labels() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    parts = partition_indices(labels, 10, "shards", shards_per_worker=2, seed=0)
    # 20 shards of 50 over classes of 100: every shard holds one label.
    assert all(np.unique(labels[part]).size <= 2 for part in parts)
    assert all(part.size == 100 for part in parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 3, "scheme": "round-robin"}, "partition scheme"),
        ({"num_workers": 11, "scheme": "iid"}, "num_workers"),
        ({"num_workers": 0, "scheme": "iid"}, "num_workers"),
        ({"num_workers": 2, "scheme": "dirichlet", "dir_alpha": 0.0}, "dir_alpha"),
        ({"num_workers": 5, "scheme": "shards", "shards_per_worker": 3}, "shards_per_worker"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition_indices(np.arange(10) % 2, **kwargs)  # type: ignore[arg-type]


# --- worker ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker_id", "expected"), [("w3", 3), ("worker-3", 3), ("3", 3), ("w0", 0)]
)
def test_worker_index_reads_the_trailing_integer(worker_id: str, expected: int) -> None:
    assert worker_index(worker_id, 8) == expected


def test_worker_index_out_of_range_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"'jetson-12'.*12.*total_workers is 10"):
        worker_index("jetson-12", 10)
    with pytest.raises(ValueError, match="total_workers"):
        worker_index("w0", 0)


def test_worker_index_without_a_number_is_stable_across_processes() -> None:
    names = ["jetson-alpha", "lab-bench", "nano-east"]
    here = [worker_index(name, 7) for name in names]
    assert all(0 <= index < 7 for index in here)
    code = (
        "from flq.learning.partition import worker_index\n"
        f"print([worker_index(n, 7) for n in {names!r}])"
    )
    # A different string-hash seed would change hash(); the mapping must not change.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(here)


# --- one worker's part ---------------------------------------------------------------------------


def _digits_part(index: int) -> ArrayData:
    return load_worker_partition(
        "digits",
        "",
        num_workers=4,
        index=index,
        scheme="dirichlet",
        dir_alpha=0.5,
        shards_per_worker=2,
        seed=5,
        test_fraction=0.25,
    )


def _sorted_rows(data: ArrayData) -> np.ndarray:
    rows = np.column_stack([data.x.reshape(len(data), -1), data.y])
    return rows[np.lexsort(rows.T[::-1])]


def test_worker_partitions_of_digits_rebuild_the_training_set() -> None:
    _, train, _ = load_dataset("digits", seed=5)
    parts = [_digits_part(i) for i in range(4)]
    assert all(len(part) >= MIN_SAMPLES for part in parts)
    together = ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    assert np.array_equal(_sorted_rows(together), _sorted_rows(train))
    with pytest.raises(ValueError, match="index"):
        _digits_part(4)

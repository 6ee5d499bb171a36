"""Split a training set across workers (numpy only, deterministic by seed).

Every worker computes the same partition from the same seed and keeps only its own part, so no
coordinator has to ship indices. Schemes:

- `iid`: a seeded shuffle cut into near-equal parts.
- `dirichlet`: for every class, proportions over workers drawn from Dirichlet(alpha); small alpha
  gives each worker few classes. Draws are repeated (a bounded number of times, same generator)
  until every worker holds at least `min(MIN_SAMPLES, n // num_workers)` samples; if that never
  happens the short workers are topped up from the largest ones, deterministically.
- `shards`: samples sorted by label (ties in seeded order), cut into num_workers * shards_per_worker
  contiguous shards, and each worker dealt `shards_per_worker` shards at random.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

import numpy as np

from flq.learning.data import ArrayData, load_dataset, stratified_test_mask

SCHEMES: Final = ("iid", "dirichlet", "shards")
MIN_SAMPLES: Final = 10  # the fewest samples a Dirichlet worker may hold (if the data allows)
DIRICHLET_REDRAWS: Final = 20
_TRAILING_INT = re.compile(r"(\d+)$")


def partition_indices(
    labels: np.ndarray,
    num_workers: int,
    scheme: str,
    *,
    dir_alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Disjoint int64 index arrays (sorted), one per worker, whose union is every sample."""
    labels = np.asarray(labels)
    _check_partition_args(labels, num_workers, scheme, dir_alpha, shards_per_worker)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(labels.shape[0]), num_workers)
    elif scheme == "dirichlet":
        parts = _dirichlet_parts(labels, num_workers, dir_alpha, rng)
    else:
        parts = _shard_parts(labels, num_workers, shards_per_worker, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def _check_partition_args(
    labels: np.ndarray, num_workers: int, scheme: str, dir_alpha: float, shards_per_worker: int
) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}")
    if scheme not in SCHEMES:
        raise ValueError(f"partition scheme: got {scheme!r}, expected one of {list(SCHEMES)}")
    if not 1 <= num_workers <= labels.shape[0]:
        raise ValueError(
            f"num_workers: got {num_workers}, expected 1..{labels.shape[0]} (one sample each)"
        )
    if scheme == "dirichlet" and not dir_alpha > 0:
        raise ValueError(f"dir_alpha: got {dir_alpha}, expected > 0")
    if scheme == "shards" and not 1 <= shards_per_worker * num_workers <= labels.shape[0]:
        raise ValueError(
            f"shards_per_worker: got {shards_per_worker}; need 1 <= shards_per_worker and "
            f"num_workers * shards_per_worker <= {labels.shape[0]} samples"
        )


def _dirichlet_parts(
    labels: np.ndarray, num_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    min_size = min(MIN_SAMPLES, labels.shape[0] // num_workers)
    parts = _dirichlet_draw(labels, num_workers, alpha, rng)
    for _ in range(DIRICHLET_REDRAWS):
        if min(part.size for part in parts) >= min_size:
            return parts
        parts = _dirichlet_draw(labels, num_workers, alpha, rng)
    return _top_up(parts, min_size, rng)


def _dirichlet_draw(
    labels: np.ndarray, num_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_workers, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for worker, piece in enumerate(np.split(members, cuts)):
            pieces[worker].append(piece)
    return [np.concatenate(worker_pieces) for worker_pieces in pieces]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move samples from the largest parts to any part below `min_size`."""
    parts = [rng.permutation(part) for part in parts]
    for short in np.argsort([part.size for part in parts], kind="stable"):
        while parts[short].size < min_size:
            donor = int(np.argmax([part.size for part in parts]))
            take = min(min_size - parts[short].size, parts[donor].size - min_size)
            parts[short] = np.concatenate([parts[short], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts


def _shard_parts(
    labels: np.ndarray, num_workers: int, shards_per_worker: int, rng: np.random.Generator
) -> list[np.ndarray]:
    shuffled = rng.permutation(labels.shape[0])
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_workers * shards_per_worker)
    dealt = rng.permutation(len(shards)).reshape(num_workers, shards_per_worker)
    return [np.concatenate([shards[s] for s in worker_shards]) for worker_shards in dealt]


def worker_index(worker_id: str, total_workers: int) -> int:
    """The 0-based partition a worker id maps to.

    The trailing integer of the id counts ("w3", "worker-3", "3" -> 3) and must be below
    `total_workers`. An id without one ("jetson-alpha") maps to CRC-32 of its UTF-8 bytes modulo
    `total_workers`: stable across processes and Python versions (unlike `hash`), but two such ids
    may collide, so name workers with numbers when partitions must not overlap.
    """
    if total_workers < 1:
        raise ValueError(f"total_workers: got {total_workers}, expected >= 1")
    match = _TRAILING_INT.search(worker_id)
    if match is None:
        return zlib.crc32(worker_id.encode("utf-8")) % total_workers
    index = int(match.group(1))
    if index >= total_workers:
        raise ValueError(
            f"worker id {worker_id!r} maps to partition {index}, but total_workers is "
            f"{total_workers} (ids are 0-based: use 0..{total_workers - 1})"
        )
    return index


def load_worker_partition(
    name: str,
    data_dir: str,
    *,
    num_workers: int,
    index: int,
    scheme: str,
    dir_alpha: float,
    shards_per_worker: int,
    seed: int,
    test_fraction: float,
    server_share: float = 0.0,
) -> ArrayData:
    """This worker's own training samples (a copy); the rest of the dataset is not kept. The
    master's held-out share (`server_share`, see `split_server_share`) is never a worker's."""
    if not 0 <= index < num_workers:
        raise ValueError(f"index: got {index}, expected 0..{num_workers - 1}")
    _, train, _ = load_dataset(name, data_dir, test_fraction=test_fraction, seed=seed)
    _, train = split_server_share(train, server_share, seed)
    parts = partition_indices(
        train.y,
        num_workers,
        scheme,
        dir_alpha=dir_alpha,
        shards_per_worker=shards_per_worker,
        seed=seed,
    )
    return train.subset(parts[index])


def split_server_share(train: ArrayData, share: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """(the master's share, the workers' rest) of a training set: `share` of every class, chosen
    by `seed`, so the master and every worker compute the same split without shipping indices.
    Share 0 leaves everything to the workers."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"server_share: got {share}, expected 0 <= share < 1")
    if share == 0.0:
        return train.subset(np.zeros(0, dtype=np.int64)), train
    held = stratified_test_mask(train.y, share, seed)
    return train.subset(np.flatnonzero(held)), train.subset(np.flatnonzero(~held))

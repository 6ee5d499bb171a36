"""The data of the custom example: each board reads its own CSV file from a local directory.

The directory (CUSTOM_DATA_DIR, default ./data beside this file) holds `worker-<i>.csv` on worker
i and `test.csv` on the master: one sample per line, `label,pixel_0,...,pixel_63` with pixels
0..16 (make_data.py writes them from scikit-learn's digits).

FLQ calls `load(worker_index=i, num_workers=n)` on worker i, which returns only that board's
samples (so FLQ does not partition them again), and `load(worker_index=None, num_workers=n)` on
the master, which needs only the test part.
"""

import os
from pathlib import Path

import numpy as np

SIDE = 8
MAX_PIXEL = 16.0


def data_dir() -> Path:
    return Path(os.environ.get("CUSTOM_DATA_DIR", Path(__file__).parent / "data"))


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    labels = rows[:, 0].astype(np.int64)
    images = (rows[:, 1:] / MAX_PIXEL).reshape(-1, SIDE, SIDE, 1)
    return images, labels


def empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, SIDE, SIDE, 1), np.float32), np.zeros((0,), np.int64)


def load(worker_index: int | None = None, num_workers: int = 1):
    root = data_dir()
    test_file = root / "test.csv"
    test = read_csv(test_file) if test_file.is_file() else empty()
    if worker_index is None:  # the master: evaluation only
        return empty(), test
    return read_csv(root / f"worker-{worker_index}.csv"), test

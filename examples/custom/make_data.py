"""Write the custom example's data directory from scikit-learn's digits (no download).

    python examples/custom/make_data.py DIRECTORY [--workers N]

writes DIRECTORY/worker-0.csv .. worker-<N-1>.csv (the training samples dealt round-robin) and
DIRECTORY/test.csv (a quarter of the samples). On real boards each one holds only its own file.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def write(directory: Path, workers: int, seed: int = 0) -> None:
    digits = load_digits()
    rows = np.column_stack([digits.target, digits.data]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(rows))
    test_count = len(rows) // 4
    test, train = rows[order[:test_count]], rows[order[test_count:]]
    directory.mkdir(parents=True, exist_ok=True)
    np.savetxt(directory / "test.csv", test, fmt="%d", delimiter=",")
    for index in range(workers):
        share = train[index::workers]
        np.savetxt(directory / f"worker-{index}.csv", share, fmt="%d", delimiter=",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    write(args.directory, args.workers)


if __name__ == "__main__":
    main()

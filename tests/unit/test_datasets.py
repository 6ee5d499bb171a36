"""Dataset loading (numpy only): digits, IDX files, npz, the cache, and the no-TensorFlow import."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flq.learning.data import (
    DEFAULT_DIRS,
    DataError,
    clear_cache,
    load_dataset,
    stratified_test_mask,
)

FASHION_DIR = Path(DEFAULT_DIRS["fashion-mnist"])


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def test_importing_the_learning_package_does_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "import flq.learning, flq.learning.data, flq.learning.partition\n"
        "import flq.learning.models, flq.learning.trainer, flq.learning.device\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "assert 'tensorflow' not in sys.modules, loaded\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- digits --------------------------------------------------------------------------------------


def test_digits_are_scaled_8x8_images_with_int64_labels() -> None:
    spec, train, test = load_dataset("digits")
    assert spec.input_shape == (8, 8, 1)
    assert spec.num_classes == 10
    for part in (train, test):
        assert part.x.dtype == np.float32
        assert part.y.dtype == np.int64
        assert part.x.shape[1:] == (8, 8, 1)
        assert part.x.min() >= 0.0 and part.x.max() <= 1.0
    assert train.x.max() == 1.0  # pixel 16 of 16 exists, so the scale is 1/16, not 1/255
    assert len(train) + len(test) == 1797


def test_digits_split_is_stratified_and_follows_test_fraction() -> None:
    _, train, test = load_dataset("digits", test_fraction=0.25, seed=3)
    per_class = np.bincount(train.y) + np.bincount(test.y)
    test_share = np.bincount(test.y) / per_class
    assert np.all(np.abs(test_share - 0.25) < 0.01)


def test_digits_split_is_deterministic_by_seed() -> None:
    _, first, _ = load_dataset("digits", seed=1)
    _, again, _ = load_dataset("digits", seed=1)
    _, other, _ = load_dataset("digits", seed=2)
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    assert not np.array_equal(first.x, other.x)


def test_stratified_mask_takes_the_rounded_fraction_of_every_class() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 41])
    mask = stratified_test_mask(labels, 0.3, seed=0)
    assert np.bincount(labels[mask]).tolist() == [round(0.3 * n) for n in (10, 20, 30, 41)]


def test_bad_test_fraction_and_unknown_dataset_are_rejected() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("cifar")


# --- IDX files -----------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(root: Path, *, compress: bool, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, 6, 7), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = _idx_bytes(array)
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_idx_files_decode_to_scaled_images_and_labels(tmp_path: Path, compress: bool) -> None:
    _write_idx_set(tmp_path, compress=compress)
    spec, train, test = load_dataset("mnist", str(tmp_path))
    raw = np.frombuffer(_read(tmp_path, "train-images-idx3-ubyte"), np.uint8, offset=16)
    labels = np.frombuffer(_read(tmp_path, "train-labels-idx1-ubyte"), np.uint8, offset=8)
    assert spec.input_shape == (6, 7, 1)
    assert train.x.shape == (12, 6, 7, 1) and test.x.shape == (5, 6, 7, 1)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_allclose(train.x.ravel(), raw / 255.0, rtol=1e-6)
    assert np.array_equal(train.y, labels)


def _read(root: Path, name: str) -> bytes:
    plain = root / name
    return (
        plain.read_bytes()
        if plain.exists()
        else gzip.decompress((root / f"{name}.gz").read_bytes())
    )


def test_corrupt_magic_number_names_the_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 1  # claims one dimension
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic"):
        load_dataset("mnist", str(tmp_path))


def test_truncated_idx_file_names_the_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, compress=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*bytes"):
        load_dataset("mnist", str(tmp_path))


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, compress=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", str(tmp_path))


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, compress=False)
    other = tmp_path / "other"
    other.mkdir()
    _write_idx_set(other, compress=False, n_train=9)
    os.replace(other / "train-labels-idx1-ubyte", tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"12 images.*9 labels"):
        load_dataset("mnist", str(tmp_path))


def test_missing_directory_says_how_to_install(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as caught:
        load_dataset("fashion-mnist", str(missing))
    assert str(missing) in str(caught.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, compress=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_decoded_arrays_are_cached_read_only_and_refreshed_when_the_file_changes(
    tmp_path: Path,
) -> None:
    _write_idx_set(tmp_path, compress=True)
    _, first, _ = load_dataset("mnist", str(tmp_path))
    _, again, _ = load_dataset("mnist", str(tmp_path))
    assert again.x is first.x
    assert not first.x.flags.writeable
    _write_idx_set(tmp_path, compress=True, n_train=7)
    _, changed, _ = load_dataset("mnist", str(tmp_path))
    assert len(changed) == 7


@pytest.mark.system_deps
def test_fashion_mnist_loads_from_the_debian_package() -> None:
    # `make test` installs dataset-fashion-mnist (Makefile: system-deps); its load speed is
    # measured in bench/, not asserted here.
    assert FASHION_DIR.is_dir(), f"{FASHION_DIR} missing: run `make system-deps`"
    spec, train, test = load_dataset("fashion-mnist")
    assert spec.input_shape == (28, 28, 1) and spec.num_classes == 10
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert np.bincount(train.y).tolist() == [6000] * 10
    assert float(train.x.max()) == 1.0


# --- npz -----------------------------------------------------------------------------------------


def _write_npz(path: Path, **overrides: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, size=(8, 5, 5), dtype=np.uint8),
        "y_train": rng.integers(0, 3, size=8),
        "x_test": rng.integers(0, 256, size=(4, 5, 5), dtype=np.uint8),
        "y_test": np.array([0, 1, 2, 3]),
    }
    arrays.update(overrides)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def test_npz_bytes_are_scaled_and_gain_a_channel(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    _write_npz(path)
    spec, train, test = load_dataset("npz", str(path))
    with np.load(path) as raw:
        np.testing.assert_allclose(train.x[..., 0], raw["x_train"] / 255.0, rtol=1e-6)
    assert spec.input_shape == (5, 5, 1)
    assert spec.num_classes == 4  # the largest label anywhere, plus one
    assert test.y.dtype == np.int64


def test_npz_floats_outside_unit_range_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    _write_npz(path, x_train=np.full((8, 5, 5), 3.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"mine\.npz.*x_train"):
        load_dataset("npz", str(path))


def test_npz_missing_arrays_and_paths_are_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((2, 3, 3)))
    with pytest.raises(DataError, match="y_train"):
        load_dataset("npz", str(path))
    with pytest.raises(DataError, match=r"absent\.npz"):
        load_dataset("npz", str(tmp_path / "absent.npz"))
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("npz", "")

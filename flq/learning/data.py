"""Datasets as numpy arrays (no TensorFlow here).

Images come back as float32 in [0, 1] with shape (n, H, W, 1) and labels as int64, whatever the
source: scikit-learn's embedded `digits` (no download), Fashion-MNIST / MNIST IDX files (gzipped or
not), or a user's own `.npz`. Decoded IDX and npz arrays are cached in-process, keyed by the file's
path, size and modification time, so every worker in a simulation shares one decode; cached arrays
are read-only so no caller can change what the next one gets.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from flq.errors import DataUnavailable

DATASETS: Final = ("digits", "fashion-mnist", "mnist", "npz")

DEFAULT_DIRS: Final = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
INSTALL_HINTS: Final = {
    "fashion-mnist": (
        "install it with `apt-get install dataset-fashion-mnist` or set dataset.data_dir"
    ),
    "mnist": "copy the MNIST IDX files (train-images-idx3-ubyte.gz, ...) there "
    "or set dataset.data_dir",
}
IDX_FILES: Final = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPZ_KEYS: Final = ("x_train", "y_train", "x_test", "y_test")

# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
IDX_UBYTE: Final = 0x08
GZIP_MAGIC: Final = b"\x1f\x8b"
GZIP_WBITS: Final = 16 + zlib.MAX_WBITS  # expect a gzip header and trailer
IMAGE_NDIM: Final = 3
LABEL_NDIM: Final = 1
DIGITS_MAX_PIXEL: Final = 16.0
BYTE_MAX_PIXEL: Final = 255.0


class DataError(DataUnavailable, RuntimeError):
    """A dataset is missing or unreadable; the message names the file and how to get it."""


@dataclass(frozen=True)
class ArrayData:
    """Samples and labels: x float32 in [0, 1] ((n, H, W, 1) for images), y int64."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayData:
        return ArrayData(x=self.x[indices], y=self.y[indices])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int


_CacheKey = tuple[str, int, int]
_Decoder = Callable[[Path], tuple[np.ndarray, ...]]
_cache: dict[_CacheKey, tuple[np.ndarray, ...]] = {}


def load_dataset(
    name: str, data_dir: str = "", *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[DatasetSpec, ArrayData, ArrayData]:
    """Return (spec, train, test).

    `test_fraction` and `seed` only split `digits`; IDX and npz sources bring their own test set.
    For `npz`, `data_dir` is the path of the `.npz` file.
    """
    if name == "digits":
        train, test = _load_digits(test_fraction, seed)
    elif name in DEFAULT_DIRS:
        train, test = _load_idx_pair(name, data_dir or DEFAULT_DIRS[name])
    elif name == "npz":
        train, test = _load_npz(data_dir)
    else:
        raise ValueError(f"dataset: got {name!r}, expected one of {list(DATASETS)}")
    return _spec_for(name, train, test), train, test


def _spec_for(name: str, train: ArrayData, test: ArrayData) -> DatasetSpec:
    labels_max = max(int(train.y.max(initial=0)), int(test.y.max(initial=0)))
    return DatasetSpec(
        name=name, input_shape=tuple(int(d) for d in train.x.shape[1:]), num_classes=labels_max + 1
    )


# --- digits (embedded in scikit-learn) ---------------------------------------------------------


def _load_digits(test_fraction: float, seed: int) -> tuple[ArrayData, ArrayData]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: got {test_fraction}, expected 0 < test_fraction < 1")
    x, y = _digits_arrays()
    test_mask = stratified_test_mask(y, test_fraction, seed)
    return ArrayData(x[~test_mask], y[~test_mask]), ArrayData(x[test_mask], y[test_mask])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    key: _CacheKey = ("sklearn:digits", 0, 0)
    if key not in _cache:
        # Imported here: scikit-learn costs ~1 s to import and only `digits` needs it.
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]

        digits = load_digits()
        x = (digits.images / DIGITS_MAX_PIXEL).astype(np.float32)[..., np.newaxis]
        _cache[key] = (_read_only(x), _read_only(digits.target.astype(np.int64)))
    x, y = _cache[key]
    return x, y


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test samples: `test_fraction` of every class (rounded), chosen by seed."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        mask[members[: round(test_fraction * members.size)]] = True
    return mask


# --- IDX (MNIST / Fashion-MNIST) ----------------------------------------------------------------


def _load_idx_pair(name: str, directory: str) -> tuple[ArrayData, ArrayData]:
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{name}: directory {root} does not exist; {INSTALL_HINTS[name]}")
    train, test = (_load_idx_split(name, root, split) for split in ("train", "test"))
    return train, test


def _load_idx_split(name: str, root: Path, split: str) -> ArrayData:
    images_name, labels_name = IDX_FILES[split]
    images_path = _find_idx_file(name, root, images_name)
    labels_path = _find_idx_file(name, root, labels_name)
    images = _cached(images_path, lambda p: (_decode_images(p),))[0]
    labels = _cached(labels_path, lambda p: (_decode_labels(p),))[0]
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name}: {images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    return ArrayData(images, labels)


def _find_idx_file(name: str, root: Path, base: str) -> Path:
    for candidate in (root / base, root / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{name}: {root / base}[.gz] not found; {INSTALL_HINTS[name]}")


def _decode_images(path: Path) -> np.ndarray:
    pixels = _parse_idx(path, IMAGE_NDIM)
    count, rows, cols = pixels.shape
    scaled: np.ndarray = np.multiply(pixels, np.float32(1.0 / BYTE_MAX_PIXEL), dtype=np.float32)
    return scaled.reshape(count, rows, cols, 1)


def _decode_labels(path: Path) -> np.ndarray:
    return _parse_idx(path, LABEL_NDIM).astype(np.int64)


def _parse_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Decode an unsigned-byte IDX file; DataError naming the file if anything does not add up."""
    raw = _read_maybe_gzipped(path)
    header_size = 4 + 4 * expected_ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    zeros, type_code, ndim = raw[0:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or type_code != IDX_UBYTE or ndim != expected_ndim:
        magic = int.from_bytes(raw[0:4], "big")
        wanted = (IDX_UBYTE << 8) | expected_ndim
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{wanted:08x}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_size + int(np.prod(shape))
    if len(raw) != expected_bytes:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({expected_bytes} bytes) "
            f"but the file has {len(raw)} bytes"
        )
    values: np.ndarray = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    return values.reshape(shape)


def _gunzip(raw: bytes) -> bytes:
    # zlib is ~20% faster than gzip.decompress on one member; multi-member files fall back.
    inflater = zlib.decompressobj(GZIP_WBITS)
    data = inflater.decompress(raw)
    if not inflater.eof:
        raise EOFError("gzip stream ends early (truncated file)")
    return gzip.decompress(raw) if inflater.unused_data else data


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        # Decide by content, not name: some mirrors ship gzip files without the suffix.
        return _gunzip(raw) if raw[:2] == GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


# --- npz ------------------------------------------------------------------------------------------


def _load_npz(path_text: str) -> tuple[ArrayData, ArrayData]:
    if not path_text:
        raise DataError("npz: set dataset.data_dir to the path of a .npz file")
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"npz: {path} not found (expected a .npz with {', '.join(NPZ_KEYS)})")
    x_train, y_train, x_test, y_test = _cached(path, _decode_npz)
    return ArrayData(x_train, y_train), ArrayData(x_test, y_test)


def _decode_npz(path: Path) -> tuple[np.ndarray, ...]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; expected {list(NPZ_KEYS)}")
            arrays = {key: archive[key] for key in NPZ_KEYS}
    except (OSError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    x_train, x_test = (_npz_images(path, key, arrays[key]) for key in ("x_train", "x_test"))
    y_train, y_test = (_npz_labels(path, key, arrays[key]) for key in ("y_train", "y_test"))
    for x_key, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise DataError(f"{path}: {x_key} has {x.shape[0]} samples and {y.shape[0]} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train {x_train.shape} and x_test {x_test.shape} differ")
    return x_train, y_train, x_test, y_test


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """Bytes are scaled by 1/255, floats must lie in [0, 1]; (n, H, W) gains a channel axis."""
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / np.float32(BYTE_MAX_PIXEL)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise DataError(f"{path}: {key} has dtype {x.dtype}, expected integers or floats")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise DataError(f"{path}: {key} must hold bytes (0..255) or floats in [0, 1]")
    return x[..., np.newaxis] if x.ndim == IMAGE_NDIM else x


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise DataError(f"{path}: {key} must be a 1-D array of non-negative integer labels")
    return y.astype(np.int64)


# --- cache ----------------------------------------------------------------------------------------


def _cached(path: Path, decode: _Decoder) -> tuple[np.ndarray, ...]:
    stat = path.stat()
    key: _CacheKey = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        _cache[key] = tuple(_read_only(array) for array in decode(path))
    return _cache[key]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def clear_cache() -> None:
    """Forget decoded arrays (tests, or a long-lived process that switches datasets)."""
    _cache.clear()

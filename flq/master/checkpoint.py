"""Atomic checkpoints: a crash mid-write leaves the previous checkpoint intact.

A checkpoint is one .npz: every array under a path-like key ("theta/3", "store/w1/q/0") and the
plain values (ints, floats, strings, lists of those) as JSON under "__meta__". It is written to a
temporary file in the same directory, fsynced, then renamed over the old one (rename is atomic on
POSIX), and the directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from flq.config import Config
from flq.errors import UsageError
from flq.types import ModelInfo

META_KEY = "__meta__"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.npz"  # in the run directory


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be read or resumed from; the message names the file (exit 2)."""


def run_identity(cfg: Config) -> dict[str, str]:
    """What fixes the shape and meaning of a checkpoint's state: written into every checkpoint
    and compared at --resume before the model is built (flq.master.startup)."""
    identity: dict[str, str] = {"mode": cfg.flq_algorithm.mode, "dataset": cfg.dataset.label}
    if cfg.dataset.name != "synthetic":  # its linear model ignores the model settings
        identity |= {"model": cfg.model.label, "lora_rank": str(cfg.lora.rank)}
        if cfg.model.label == "mlp":  # the only model hidden_units shapes
            identity["hidden_units"] = str(cfg.model.hidden_units)
    return identity


def _flatten(
    state: dict[str, Any], prefix: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    for key, value in state.items():
        if "/" in key:
            raise ValueError(f"checkpoint key {key!r} must not contain '/'")
        path = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            arrays[path] = value
        elif isinstance(value, dict):
            _flatten(value, path + "/", arrays, meta)
        elif isinstance(value, list | tuple) and value and isinstance(value[0], np.ndarray):
            meta[path] = {"__arrays__": len(value)}
            for i, item in enumerate(value):
                arrays[f"{path}/{i}"] = item
        else:
            meta[path] = value


def _unflatten(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for path, value in meta.items():
        if isinstance(value, dict) and "__arrays__" in value:
            flat[path] = [arrays.pop(f"{path}/{i}") for i in range(value["__arrays__"])]
        else:
            flat[path] = value
    flat.update(arrays)
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION}
    _flatten(state, "", arrays, meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # Straight into the file: no in-memory copy of the whole state (it is the size of
            # every stored contribution: ~400 MB for 1000 workers with a 100k model).
            meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
            entries: dict[str, Any] = {**arrays, META_KEY: meta_bytes}
            np.savez(handle, **entries)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_model_npz(
    path: str | os.PathLike[str],
    weights: list[np.ndarray],
    model: ModelInfo,
    mode: str,
    round_id: int,
) -> None:
    """A model file (`model.npz` of a run, `flq model pull -o x.npz`): the weights as
    `weights/0..n` in model.get_weights() order, with the round and the model's description;
    `lora.base` and flq.learning.weights read it back."""
    description = asdict(model) | {"input_shape": list(model.input_shape)}
    save_checkpoint(
        path, {"weights": list(weights), "round": round_id, "mode": mode, **description}
    )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    source = Path(path)
    with _opened(source) as data:
        meta = _meta(source, data)
        try:
            arrays = {key: data[key] for key in data.files if key != META_KEY}
        except _UNREADABLE as error:
            raise CheckpointError(f"{source}: unreadable checkpoint ({error})") from error
    return _unflatten(arrays, meta)


def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plain values of a checkpoint without reading its arrays: a cheap check at start-up
    that the file is there, readable (a truncated zip fails here) and of this format."""
    source = Path(path)
    with _opened(source) as data:
        return _unflatten({}, {k: v for k, v in _meta(source, data).items() if not _is_list(v)})


def remove_orphans(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries a writer killed mid-write left beside `path`; returns them."""
    target = Path(path)
    orphans = sorted(target.parent.glob(f".{target.name}.*.tmp"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


# What numpy and zipfile raise for a file that is not (or no longer) a whole .npz.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


@contextlib.contextmanager
def _opened(source: Path) -> Iterator[Any]:
    if not source.exists():
        raise CheckpointError(f"{source}: no checkpoint there (start without --resume)")
    try:
        data = np.load(source, allow_pickle=False)
    except _UNREADABLE as error:
        raise CheckpointError(
            f"{source}: unreadable checkpoint, truncated or corrupt ({error})"
        ) from error
    if not hasattr(data, "files"):  # a bare .npy array, not an archive
        raise CheckpointError(f"{source}: not an FLQ checkpoint (not an .npz archive)")
    with data:
        yield data


def _meta(source: Path, data: Any) -> dict[str, Any]:
    if META_KEY not in data.files:
        raise CheckpointError(f"{source}: not an FLQ checkpoint (no {META_KEY})")
    try:
        meta: dict[str, Any] = json.loads(data[META_KEY].tobytes())
    except (*_UNREADABLE, json.JSONDecodeError) as error:
        raise CheckpointError(f"{source}: unreadable checkpoint ({error})") from error
    if meta.pop("format_version", None) != FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format differs from {FORMAT_VERSION}")
    return meta


def _is_list(value: Any) -> bool:
    return isinstance(value, dict) and "__arrays__" in value

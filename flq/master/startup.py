"""What the master checks before it builds anything expensive: problems an operator can fix,
reported as one line naming the address or file and exiting 2 (flq/cli/errors.py).

They run before the federation is built, so a wrong port or results directory is reported in a
second, not after TensorFlow's start-up.
"""

from __future__ import annotations

import errno
import socket
import tempfile
from pathlib import Path

import structlog

from flq.config import Config
from flq.errors import UsageError
from flq.master.checkpoint import CHECKPOINT_NAME, CheckpointError, checkpoint_meta, run_identity
from flq.master.checkpoint import remove_orphans as remove_checkpoint_orphans

log = structlog.get_logger("flq.master")


class StartupError(UsageError, RuntimeError):
    """The master cannot start as asked; the message names the address or file and why."""


def listen_problem(host: str, port: int) -> str:
    """Why gRPC could not bind host:port, found by binding a plain socket there (gRPC's own
    message says only "failed to bind")."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        return f"cannot resolve {host!r} ({error.strerror})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "address in use (another flq-master, or another program, listens there)"
            if error.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine"
            return error.strerror or str(error)
    return "gRPC could not bind it"


def prepare_run_dir(run_dir: Path, cfg: Config, *, resume: bool) -> None:
    """Before anything is built: the results directory takes files, temporaries of a checkpoint
    write killed mid-way are gone, and --resume has a checkpoint of this run to resume."""
    check_writable(run_dir)
    orphans = remove_checkpoint_orphans(run_dir / CHECKPOINT_NAME)
    if orphans:
        log.warning("removed temporaries of interrupted checkpoint writes", count=len(orphans))
    if resume:
        check_resumable(run_dir / CHECKPOINT_NAME, cfg)
    check_fusion_teacher(cfg)


def check_fusion_teacher(cfg: Config) -> None:
    """A teacher file that is missing or no Keras file at all is reported now, not after
    TensorFlow's start-up (its fit to the data is checked when the federation loads it)."""
    if cfg.fusion.method == "none":
        return
    from flq.learning.fusion import teacher_file_problem  # no TensorFlow at import

    problem = teacher_file_problem(cfg.fusion.teacher)
    if problem is not None:
        raise StartupError(problem)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise StartupError(
            f"{run_dir}: cannot write results there ({error.strerror or error})"
        ) from None


def check_resumable(path: Path, cfg: Config) -> None:
    """The checkpoint is there, readable, and of a run like this config's (mode, model,
    dataset): what can be known without building the model. Its shapes are checked when the
    state loads."""
    meta = checkpoint_meta(path)
    saved = meta.get("run") or {"mode": meta.get("master", {}).get("mode")}  # older files
    wanted = run_identity(cfg)
    differ = [key for key, value in saved.items() if key in wanted and value != wanted[key]]
    if differ:
        theirs = ", ".join(f"{key} {saved[key]}" for key in differ)
        ours = ", ".join(f"{key} {wanted[key]}" for key in differ)
        raise CheckpointError(
            f"{path}: written by a run with {theirs}; this config has {ours} "
            "(resume with the config it was written with, or start a new run without --resume)"
        )

"""The master's start-up checks: what they say about an address or a file an operator can fix."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flq.config import default_config, with_overrides
from flq.master.checkpoint import CheckpointError, run_identity, save_checkpoint
from flq.master.startup import check_resumable, listen_problem


def test_listen_problem_names_why_a_port_cannot_be_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert listen_problem("127.0.0.1", port).startswith("address in use")
    assert listen_problem("192.0.2.1", port) == "not an address of this machine"  # TEST-NET-1
    assert listen_problem("no-such-host.invalid", port).startswith("cannot resolve")


def _checkpoint_of(path: Path, **overrides: object) -> Path:
    cfg = with_overrides(default_config(), overrides)
    save_checkpoint(path, {"master": {"mode": cfg.flq_algorithm.mode}, "run": run_identity(cfg)})
    return path


def test_resume_refuses_another_run_and_allows_settings_that_change_no_shape(
    tmp_path: Path,
) -> None:
    cnn = {"model.name": "cnn", "dataset.name": "fashion-mnist"}
    path = _checkpoint_of(tmp_path / "checkpoint.npz", **cnn, **{"model.hidden_units": 64})
    # hidden_units shapes only the mlp; the learning rate shapes nothing.
    check_resumable(path, with_overrides(default_config(), {**cnn, "model.hidden_units": 128}))
    check_resumable(path, with_overrides(default_config(), {**cnn, "model.lr": 0.5}))
    with pytest.raises(
        CheckpointError, match="written by a run with model cnn; this config has model mlp"
    ):
        check_resumable(path, with_overrides(default_config(), {"dataset.name": "fashion-mnist"}))

    mlp = _checkpoint_of(tmp_path / "mlp.npz", **{"model.hidden_units": 64})
    with pytest.raises(CheckpointError, match="hidden_units 64; this config has hidden_units 32"):
        check_resumable(mlp, with_overrides(default_config(), {"model.hidden_units": 32}))

"""Knowledge fusion with TensorFlow: the teacher checks, both fusers on digits, and the daemon path
as a user runs it (`flq demo --fusion distill`: real master and worker processes over gRPC).

One small teacher (a narrow CNN trained a few epochs on the master's share of digits) is shared
by the module; building and tracing models dominate the cost.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flq.config import default_config, dumps_toml, with_overrides
from flq.learning.data import ArrayData, DatasetSpec, load_dataset
from flq.learning.fusion import Distiller, FusionSettings, FusionSetupError, build_fuser
from flq.learning.models import build_model
from flq.learning.partition import split_server_share
from flq.learning.teacher import save_model, train_teacher
from flq.learning.tfimport import keras
from flq.learning.trainer import Evaluator

SHARE = 0.2
SEED = 0


@pytest.fixture(scope="module")
def digits_share() -> tuple[DatasetSpec, ArrayData, ArrayData]:
    """(spec, the master's share, the test split) of digits."""
    spec, train, test = load_dataset("digits", seed=SEED)
    server, _ = split_server_share(train, SHARE, SEED)
    return spec, server, test


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.keras"
    report = train_teacher(
        path, dataset="digits", server_share=SHARE, seed=SEED, epochs=40, width=8
    )
    assert report.server_samples == 269 and report.test_accuracy > 0.6, report
    return path


def settings(method: str, teacher: Path, **changes: Any) -> FusionSettings:
    base = FusionSettings(method=method, teacher=str(teacher), model_name="mlp", steps=10)
    return FusionSettings(**{**base.__dict__, **changes})


def initial(spec: DatasetSpec) -> list[np.ndarray]:
    model = build_model("mlp", spec.input_shape, spec.num_classes, seed=SEED)
    return [np.asarray(w) for w in model.get_weights()]


def test_a_teacher_that_does_not_fit_is_refused_naming_the_file(
    tmp_path: Path, digits_share: tuple[DatasetSpec, ArrayData, ArrayData], teacher_file: Path
) -> None:
    spec, server, _ = digits_share
    weights = initial(spec)
    missing = tmp_path / "nowhere.keras"
    with pytest.raises(FusionSetupError, match=f"{missing} does not exist"):
        build_fuser(settings("distill", missing), spec, server, weights)
    garbage = tmp_path / "garbage.keras"
    garbage.write_text("not a model")
    with pytest.raises(FusionSetupError, match=f"{garbage} is not a Keras model file"):
        build_fuser(settings("distill", garbage), spec, server, weights)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # a zip's magic, nothing after it
    with pytest.raises(FusionSetupError, match=f"{broken} is not a Keras model file Keras can"):
        build_fuser(settings("distill", broken), spec, server, weights)
    five = tmp_path / "five.keras"
    save_model(build_model("mlp", spec.input_shape, 5), five)
    with pytest.raises(FusionSetupError, match=r"outputs of shape \(5,\); .* 10 classes"):
        build_fuser(settings("distill", five), spec, server, weights)
    flat = tmp_path / "flat.keras"
    save_model(build_model("mlp", (64,), 10), flat)
    with pytest.raises(FusionSetupError, match=r"inputs of shape \(64,\)"):
        build_fuser(settings("distill", flat), spec, server, weights)
    with pytest.raises(FusionSetupError, match="no Dense layer 'conv'"):
        build_fuser(
            settings("param_attention", teacher_file, student_layers=("conv",)),
            spec,
            server,
            weights,
        )


def test_distill_moves_the_student_toward_the_teacher(
    digits_share: tuple[DatasetSpec, ArrayData, ArrayData], teacher_file: Path
) -> None:
    spec, server, test = digits_share
    weights = initial(spec)
    fuser = build_fuser(settings("distill", teacher_file, steps=40), spec, server, weights)
    assert isinstance(fuser, Distiller)
    evaluator = Evaluator("mlp", spec, test, seed=SEED)
    _, before = evaluator.evaluate(weights)
    fused = fuser.fuse(weights)
    _, after = evaluator.evaluate(fused.weights)
    assert np.isfinite(fused.loss) and fused.loss > 0
    assert after > before + 0.2, (before, after)
    again = fuser.fuse(weights)  # the optimizer restarts each fusion: same start, same kind
    assert np.isfinite(again.loss)


def test_param_attention_adjusts_only_the_chosen_layer_and_learns(
    digits_share: tuple[DatasetSpec, ArrayData, ArrayData], teacher_file: Path
) -> None:
    spec, server, test = digits_share
    weights = initial(spec)
    fuser = build_fuser(
        settings("param_attention", teacher_file, attention_dim=16, attention_heads=2),
        spec,
        server,
        weights,
    )
    evaluator = Evaluator("mlp", spec, test, seed=SEED)
    losses, fused = [], weights
    for _ in range(4):
        result = fuser.fuse(weights)  # the module keeps learning across fusions
        losses.append(result.loss)
        fused = result.weights
    # mlp weights: hidden kernel, hidden bias, probs kernel, probs bias; only probs may move.
    for position in (0, 1):
        np.testing.assert_array_equal(fused[position], weights[position])
    assert not np.array_equal(fused[2], weights[2]) and not np.array_equal(fused[3], weights[3])
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    _, before = evaluator.evaluate(weights)
    _, after = evaluator.evaluate(fused)
    assert after > before, (before, after)


def _demo(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}
    command = [sys.executable, "-m", "flq.cli.main", "demo", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)


def test_demo_with_distill_fuses_in_the_master_daemon_every_round(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = _demo(out, "--fusion", "distill", "--rounds", "4", "--workers", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    with (out / "rounds.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["fusion"] for r in rows] == ["", "applied", "applied", "applied"]
    assert all(float(r["fusion_seconds"]) > 0 for r in rows[1:])
    assert all(np.isfinite(float(r["fusion_loss"])) for r in rows[1:])
    assert float(rows[-1]["accuracy"]) > 0.3
    assert (out / "teacher.keras").is_file() and "fusion (rounds)" in done.stdout


def test_a_master_with_a_bad_teacher_file_exits_2_naming_it_before_tensorflow(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "teacher.keras"
    bad.write_bytes(b"\x00" * 64)
    cfg = with_overrides(
        default_config(),
        {
            "system.master_url": "http://127.0.0.1:0",
            "fusion.method": "distill",
            "fusion.teacher": str(bad),
            "fusion.server_share": 0.1,
        },
    )
    config = tmp_path / "config.toml"
    config.write_text(dumps_toml(cfg))
    command = [
        sys.executable,
        "-m",
        "flq.cli.master",
        "run",
        "--config",
        str(config),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{bad} is not a Keras model file (neither .keras nor HDF5)" in done.stderr
    assert not (tmp_path / "run" / "rounds.csv").exists()


def test_the_teacher_module_never_imports_tensorflow_at_import() -> None:
    code = (
        "import sys, flq.learning.fusion, flq.learning.teacher; print('tensorflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
    assert keras() is not None  # and TF itself is there for the tests above

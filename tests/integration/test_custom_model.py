"""Your own model and data (TensorFlow): a builder named in the config, initial weights from a
file, the architecture digest every node compares, and examples/custom run by the real daemons."""

from __future__ import annotations

import json
import runpy
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flq.config import config_from_dict
from flq.demo import free_port
from flq.learning.architecture import architecture_of
from flq.learning.models import ModelRecipe, WeightsError
from flq.learning.plugins import PluginError, build_user_model
from tests.processes import complete_rounds, master_args, spawn, wait_until, worker_args

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom"

MODELS = """
    import keras

    def build():
        return keras.Sequential([
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])

    def wider():
        return keras.Sequential([
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(24, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])

    def unbuilt():
        return keras.Sequential([keras.layers.Dense(10, activation="softmax")])

    def not_a_model():
        return "model"
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


def test_a_builder_builds_the_same_model_and_digest_in_every_build(models: Path) -> None:
    first = build_user_model(f"{models}:build", seed=3)
    again = build_user_model(f"{models}:build", seed=3)
    # unseeded initialisers, yet the same weights: the builder runs under the federation's seed
    for a, b in zip(first.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert architecture_of(first) == architecture_of(again)  # layer names differ (dense_1...)
    wider = architecture_of(build_user_model(f"{models}:wider"))
    assert wider.digest != architecture_of(first).digest
    assert "Dense x2" in wider.description and "1,810 parameters" in wider.description


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("unbuilt", "the model is not built"),
        ("not_a_model", "build() returned str, expected a keras.Model"),
    ],
)
def test_a_builder_that_returns_no_usable_model_is_named(
    models: Path, function: str, expected: str
) -> None:
    with pytest.raises(PluginError) as error:
        build_user_model(f"{models}:{function}")
    assert f"model.builder = '{models}:{function}'" in str(error.value)
    assert expected in str(error.value)


# TensorFlow's tensors predate numpy 2's __array__(copy=...); keras' saver trips on it.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("suffix", [".keras", ".weights.h5", ".npz"])
def test_initial_weights_load_from_each_file_kind(
    models: Path, tmp_path: Path, suffix: str
) -> None:
    trained = build_user_model(f"{models}:build", seed=7)
    path = tmp_path / f"base{suffix}"
    if suffix == ".npz":
        np.savez(path, *trained.get_weights())
    elif suffix == ".keras":
        trained.save(path)
    else:
        trained.save_weights(path)
    recipe = ModelRecipe(builder=f"{models}:build", seed=0, weights=str(path))
    loaded = recipe.build((8, 8, 1), 10)
    for a, b in zip(loaded.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_of_another_model_are_refused_naming_the_file(models: Path, tmp_path: Path) -> None:
    path = tmp_path / "wide.npz"
    np.savez(path, *build_user_model(f"{models}:wider").get_weights())
    with pytest.raises(
        WeightsError, match=r"model\.weights = .*wide\.npz.*(weight arrays|the model's is)"
    ):
        ModelRecipe(builder=f"{models}:build", weights=str(path)).build((8, 8, 1), 10)
    with pytest.raises(WeightsError, match=r"absent\.keras: no such weights file"):
        ModelRecipe(weights=str(tmp_path / "absent.keras")).build((8, 8, 1), 10)


def test_the_master_starts_from_the_weights_file(models: Path, tmp_path: Path) -> None:
    from flq.master.federation import Evaluation

    trained = build_user_model(f"{models}:build", seed=11)
    path = tmp_path / "init.npz"
    np.savez(path, *trained.get_weights())
    cfg = config_from_dict(
        {"model": {"builder": f"{models}:build", "weights": str(path)}, "dataset": {}}
    )
    evaluation = Evaluation(cfg)
    for a, b in zip(evaluation.initial_weights, trained.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert evaluation.architecture == architecture_of(trained)
    loss, accuracy = evaluation.evaluate(evaluation.initial_weights)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


def _custom_config(path: Path, *, builder: str, rounds: int) -> Path:
    """examples/custom/config.toml with absolute paths (the daemons run from anywhere)."""
    text = (EXAMPLE / "config.toml").read_text()
    text = text.replace('"examples/custom/data.py:load"', json.dumps(f"{EXAMPLE}/data.py:load"))
    text = text.replace('"examples/custom/model.py:build"', json.dumps(builder))
    text = text.replace("max_rounds = 20", f"max_rounds = {rounds}")
    path.write_text(text + "\n[lazy_selection]\nwarmup = 100\n")
    return path


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


@pytest.mark.slow
def test_the_custom_example_runs_through_the_daemons_and_refuses_another_model(
    tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    runpy.run_path(str(EXAMPLE / "make_data.py"))["write"](data, 2)
    monkeypatch.setenv("CUSTOM_DATA_DIR", str(data))  # the daemons inherit it
    rounds = 3
    ours, theirs = f"{EXAMPLE}/model.py:build", f"{models}:build"
    config = _custom_config(tmp_path / "custom.toml", builder=ours, rounds=rounds)
    other = _custom_config(tmp_path / "other.toml", builder=theirs, rounds=rounds)
    port, run_dir = free_port(), tmp_path / "run"
    master = spawn(master_args(config, port, run_dir), tmp_path / "master.log")
    processes = [master]
    try:
        for index in range(2):
            processes.append(
                spawn(worker_args(config, port, f"w{index}"), tmp_path / f"w{index}.log")
            )
        # Beside them, a board with another model file: refused at its Hello, it gives up (5).
        stranger = spawn(worker_args(other, port, "w1"), tmp_path / "stranger.log")
        processes.append(stranger)
        # Generous: four TensorFlow processes start at once, on a loaded 2-core box.
        wait_until(lambda: len(complete_rounds(run_dir)) >= rounds, 900, f"{rounds} rounds")
        assert master.wait(timeout=120) == 0
        assert stranger.wait(timeout=120) == 5
        refusal = (tmp_path / "stranger.log").read_text()
        assert "model architecture differs" in refusal
        assert "Sequential: Conv2D, MaxPooling2D, Flatten, Dense x2" in refusal  # the master's
        assert "Sequential: Flatten, Dense x2" in refusal  # its own
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    rows = complete_rounds(run_dir)
    assert [int(r["round"]) for r in rows] == list(range(1, rounds + 1))
    assert all(r["failed"] == "0" for r in rows)
    assert float(rows[-1]["accuracy"]) > 0.4  # chance is 0.1; digits CSVs, one epoch a round
    ready = [
        line for line in _log_lines(tmp_path / "w0.log") if line.get("event") == "worker ready"
    ]
    assert ready and ready[0]["samples"] == 674  # its own CSV file, not a partition of both

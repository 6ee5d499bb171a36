"""LoRA-only federation: adapters on Dense layers, a frozen base identical on every node, and only
the adapters on the wire — checked on the models themselves and in a federation over real gRPC
on 127.0.0.1 (master daemon, worker connections, TensorFlow training on digits)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flq.config import Config, default_config, with_overrides
from flq.demo import child_env
from flq.learning.data import ArrayData, DatasetSpec
from flq.learning.lora import (
    LoraSpec,
    apply_lora,
    count_exchanged,
    exchanged_variables,
    frozen_weights,
    get_exchanged,
    merge_layout,
)
from flq.learning.models import build_model, count_parameters
from flq.learning.trainer import Evaluator, LocalTrainer
from flq.learning.weights import WeightsFileError, load_weights_file
from flq.master.checkpoint import load_checkpoint, write_model_npz
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.federation import Federation, build_federation
from flq.master.results import read_rounds
from flq.sim import simulate
from flq.types import ModelInfo, TrainSpec
from flq.worker.training import build_trainer
from tests.final_model import assert_final_model_scores
from tests.loopback import connect_workers

pytestmark = pytest.mark.slow  # TensorFlow training
# Keras' savers call numpy 2's __array__(copy=...) on TF tensors that predate it (as FLQ's own
# flq.learning.weights.write_keras knows): the tests save base models themselves.
saves_keras_files = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RANK = 4
HIDDEN = 32
# mlp on 8x8 digits: hidden (64 -> 32) and probs (32 -> 10) get A (in x r) and B (r x out).
ADAPTER_SHAPES = [(64, RANK), (RANK, HIDDEN), (HIDDEN, RANK), (RANK, 10)]


def test_spec_parses_the_config_form() -> None:
    assert LoraSpec.parse(4, 0.0, "all_dense") == LoraSpec(4, 0.0, ("all_dense",))
    assert LoraSpec.parse(8, 16.0, " hidden, probs ").target_layers == ("hidden", "probs")
    assert not LoraSpec.parse(0, 0.0, "all_dense").enabled
    assert LoraSpec(4).scale_alpha == 4.0 and LoraSpec(4, 8.0).scale_alpha == 8.0


def test_only_the_adapters_are_trainable_and_exchanged(
    digits: tuple[DatasetSpec, ArrayData, ArrayData],
) -> None:
    spec = digits[0]
    model = build_model("mlp", spec.input_shape, spec.num_classes, hidden_units=HIDDEN, seed=3)
    total = count_parameters(model)
    assert apply_lora(model, LoraSpec(RANK), seed=3) == ["hidden", "probs"]
    assert [tuple(w.shape) for w in model.trainable_weights] == ADAPTER_SHAPES
    assert [tuple(v.shape) for v in exchanged_variables(model)] == ADAPTER_SHAPES
    assert count_exchanged(model) == sum(int(np.prod(s)) for s in ADAPTER_SHAPES)
    assert count_parameters(model) == total + count_exchanged(model)
    # B starts at zero: the adapted model computes exactly what the base model computes.
    assert not np.any(get_exchanged(model)[1]) and not np.any(get_exchanged(model)[3])


def test_named_targets_and_unknown_names(digits: tuple[DatasetSpec, ArrayData, ArrayData]) -> None:
    spec = digits[0]
    model = build_model("mlp", spec.input_shape, spec.num_classes, hidden_units=HIDDEN)
    assert apply_lora(model, LoraSpec(2, 0.0, ("probs",)), seed=0) == ["probs"]
    assert [tuple(w.shape) for w in model.trainable_weights] == [(HIDDEN, 2), (2, 10)]
    other = build_model("mlp", spec.input_shape, spec.num_classes, hidden_units=HIDDEN)
    with pytest.raises(ValueError, match=r"no Dense layer named dense_9.*hidden, probs"):
        apply_lora(other, LoraSpec(2, 0.0, ("dense_9",)), seed=0)


def test_every_node_builds_the_same_base_and_adapters(
    digits: tuple[DatasetSpec, ArrayData, ArrayData],
) -> None:
    spec, train, test = digits
    lora = LoraSpec(RANK)
    # Two workers: different shuffling seeds, the federation's model seed.
    a = LocalTrainer("mlp", spec, train, hidden_units=HIDDEN, seed=1, model_seed=5, lora=lora)
    b = LocalTrainer("mlp", spec, train, hidden_units=HIDDEN, seed=2, model_seed=5, lora=lora)
    for x, y in zip(frozen_weights(a.model), frozen_weights(b.model), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.initial_weights(), b.initial_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    evaluator = Evaluator("mlp", spec, test, hidden_units=HIDDEN, seed=5, lora=lora)
    assert [w.shape for w in evaluator._model.trainable_weights] == [
        w.shape for w in a.model.trainable_weights
    ]


def test_training_moves_only_the_adapters(digits: tuple[DatasetSpec, ArrayData, ArrayData]) -> None:
    spec, train, _ = digits
    trainer = LocalTrainer(
        "mlp", spec, train, hidden_units=HIDDEN, seed=0, lora=LoraSpec(RANK, 8.0)
    )
    base = frozen_weights(trainer.model)
    start = trainer.initial_weights()
    result = trainer.train(start, TrainSpec(local_steps=5, lr=0.1, l2=1e-3))
    assert [d.shape for d in result.delta] == ADAPTER_SHAPES
    assert all(np.any(d != 0) for d in result.delta)
    for before, after in zip(base, frozen_weights(trainer.model), strict=True):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match=r"weights\[0\]: got shape \(64, 4\)"):
        LocalTrainer("mlp", spec, train, hidden_units=HIDDEN).train(start, TrainSpec())  # no LoRA


def test_merged_weights_are_a_plain_model_that_computes_the_same(
    digits: tuple[DatasetSpec, ArrayData, ArrayData],
) -> None:
    spec, train, test = digits
    lora = LoraSpec(RANK, 8.0)
    trainer = LocalTrainer("mlp", spec, train, hidden_units=HIDDEN, seed=0, lora=lora)
    start = trainer.initial_weights()
    result = trainer.train(start, TrainSpec(local_steps=5, lr=0.1))
    adapters = [w + d for w, d in zip(start, result.delta, strict=True)]
    merged = merge_layout(trainer.model).merged(adapters)
    assert [w.shape for w in merged] == [(64, HIDDEN), (HIDDEN,), (HIDDEN, 10), (10,)]
    plain = Evaluator("mlp", spec, test, hidden_units=HIDDEN)  # no LoRA: a user's model
    adapted = Evaluator("mlp", spec, test, hidden_units=HIDDEN, seed=0, lora=lora)
    assert plain.evaluate(merged) == pytest.approx(adapted.evaluate(adapters), rel=1e-4)


def lora_config(**overrides: Any) -> Config:
    values: dict[str, Any] = {
        "system.total_workers": 3,
        "system.min_workers": 3,
        "system.max_rounds": 8,
        "system.round_timeout_s": 60.0,
        "system.master_url": "http://127.0.0.1:0",
        "dataset.name": "digits",
        "model.name": "mlp",
        "model.hidden_units": HIDDEN,
        "model.local_steps": 0,
        "model.local_epochs": 1,
        "model.lr": 0.2,
        "flq_algorithm.mode": "bbit",
        "flq_algorithm.b_up": 8,
        "flq_algorithm.b_down": 32,
        "lora.rank": RANK,
    }
    values.update(overrides)
    return with_overrides(default_config(), values)


def test_a_lora_federation_over_grpc_sends_only_adapters_and_learns(tmp_path: Path) -> None:
    cfg = lora_config()
    received: list[list[tuple[int, ...]]] = []

    def federation(c: Config) -> Federation:
        fed = build_federation(c)
        receive = fed.engine._recv_upload

        async def recording(*args: Any) -> Any:
            encoded = await receive(*args)
            received.append([e.shape for e in encoded])  # what arrived over the wire
            return encoded

        fed.engine._recv_upload = recording  # type: ignore[method-assign]
        return fed

    trainers = [build_trainer(cfg, f"w{i}", i)[0] for i in range(3)]
    base = frozen_weights(trainers[0].trainer.model)

    async def scenario() -> MasterDaemon:
        daemon = MasterDaemon(
            cfg, MasterOptions(port=0, run_dir=tmp_path, federation_factory=federation)
        )
        master = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 60)
        stop = asyncio.Event()
        workers = connect_workers(daemon.port, trainers, stop, heartbeat_s=1.0)
        await asyncio.wait_for(master, 120)
        await asyncio.wait_for(asyncio.gather(*workers), 20)
        return daemon

    daemon = asyncio.run(scenario())
    assert received and all(shapes == ADAPTER_SHAPES for shapes in received)
    assert daemon.federation is not None
    assert [w.shape for w in daemon.federation.state.weights] == ADAPTER_SHAPES
    _, served = daemon.control.global_model()  # GetGlobalModel: the plain model, adapters merged in
    assert [e.shape for e in served] == [(64, HIDDEN), (HIDDEN,), (HIDDEN, 10), (10,)]
    for before, after in zip(base, frozen_weights(trainers[0].trainer.model), strict=True):
        np.testing.assert_array_equal(before, after)  # the base never moved on the worker
    rows = read_rounds(tmp_path / "rounds.csv")
    accuracy = [float(r["accuracy"]) for r in rows]
    assert len(rows) == 8 and accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0] + 0.2
    summary = json.loads((tmp_path / "summary.json").read_text())
    exchanged = sum(int(np.prod(s)) for s in ADAPTER_SHAPES)
    assert summary["exchanged_parameters"] == exchanged and summary["lora_rank"] == RANK
    # The served model has no adapters: total = parameters = what full-model federation sends.
    served = [(64, HIDDEN), (HIDDEN,), (HIDDEN, 10), (10,)]
    assert summary["total_parameters"] == summary["parameters"] == sum(map(np.prod, served))
    per_upload = summary["uplink_bytes_per_upload"]
    uploads = sum(int(r["selected"]) for r in rows)
    assert per_upload == pytest.approx(sum(int(r["uplink_bits"]) for r in rows) / 8 / uploads)
    # 8 bits per value and a header per tensor (codec/bits 16, 32 per dim, the radius 32).
    assert per_upload == sum(np.prod(s) + (16 + 32 * len(s) + 32) / 8 for s in ADAPTER_SHAPES)
    full_model = sum(np.prod(s) + (16 + 32 * len(s) + 32) / 8 for s in served)
    assert summary["full_model_uplink_bytes_per_upload"] == pytest.approx(full_model, abs=0.1)
    assert_final_model_scores(tmp_path, lora_config(), rows[-1]["accuracy"])


def test_demo_runs_a_lora_only_federation_with_one_command(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--lora-rank", str(RANK), "--workers", "2", "--rounds", "4", "--no-lazy"]
    result = subprocess.run(
        [sys.executable, "-m", "flq.cli.main", *args, "--out", str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    hidden = 64  # the demo's mlp
    adapters = 64 * RANK + RANK * hidden + hidden * RANK + RANK * 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exchanged_parameters"] == summary["demo"]["exchanged_parameters"] == adapters
    assert summary["demo"]["total_parameters"] == 64 * hidden + hidden + hidden * 10 + 10
    saved = load_checkpoint(out / "checkpoint.npz")["master"]["weights"]
    assert [tuple(w.shape) for w in saved] == [
        (64, RANK),
        (RANK, hidden),
        (hidden, RANK),
        (RANK, 10),
    ]
    accuracy = [float(r["accuracy"]) for r in read_rounds(out / "rounds.csv")]
    assert len(accuracy) == 4 and accuracy[-1] > accuracy[0]
    assert "parameters sent / in model" in result.stdout


# ---------------------------------------------------------------- a pretrained base


@pytest.fixture(scope="module")
def pretrained_base(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[DatasetSpec, ArrayData, ArrayData]
) -> tuple[Path, float]:
    """The mlp trained centrally on a public third of digits' training split, as .keras, and its
    test accuracy (the federation's workers hold the same split: a base that already knows)."""
    from flq.learning.tfimport import keras

    spec, train, test = digits
    model = build_model("mlp", spec.input_shape, spec.num_classes, hidden_units=HIDDEN, seed=7)
    public = train.subset(np.arange(len(train) // 3))
    model.compile(optimizer=keras().optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(public.x, public.y, epochs=30, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("base") / "base.keras"
    model.save(path)
    accuracy = float(np.mean(np.argmax(model.predict(test.x, verbose=0), -1) == test.y))
    return path, accuracy


@saves_keras_files
def test_weights_files_load_all_or_nothing(
    tmp_path: Path, digits: tuple[DatasetSpec, ArrayData, ArrayData]
) -> None:
    spec = digits[0]

    def mlp(seed: int, hidden: int = HIDDEN) -> Any:
        return build_model(
            "mlp", spec.input_shape, spec.num_classes, hidden_units=hidden, seed=seed
        )

    source = mlp(1)
    weights = source.get_weights()
    source.save(tmp_path / "a.keras")
    source.save_weights(tmp_path / "a.weights.h5")
    np.savez(tmp_path / "plain.npz", *weights)
    write_model_npz(tmp_path / "flq.npz", weights, ModelInfo("mlp"), "bbit", 3)
    for name in ("a.keras", "a.weights.h5", "plain.npz", "flq.npz"):
        target = mlp(2)
        load_weights_file(target, tmp_path / name)
        for ours, theirs in zip(target.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(ours, theirs)

    other = mlp(3, hidden=16)  # another architecture: refused, and left as it was
    before = other.get_weights()
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    problems = {
        "a.keras": "cannot load it into model mlp",
        "a.weights.h5": "cannot load it into model mlp",
        "plain.npz": r"weight 0 has shape \(64, 32\), the model's is \(64, 16\)",
        "missing.keras": "no such weights file",
        "junk.keras": "junk.keras: cannot load it",
        "a.h5": "expected a file ending in .keras, .weights.h5, .npz",
    }
    (tmp_path / "a.h5").write_bytes(b"")
    for name, problem in problems.items():
        with pytest.raises(WeightsFileError, match=problem):
            load_weights_file(other, tmp_path / name)
        for now, then in zip(other.get_weights(), before, strict=True):
            np.testing.assert_array_equal(now, then)


@saves_keras_files
def test_lora_on_a_pretrained_base_starts_from_it_and_learns(
    tmp_path: Path, pretrained_base: tuple[Path, float]
) -> None:
    base, base_accuracy = pretrained_base
    overrides = {"system.max_rounds": 3, "system.round_timeout_s": 120.0}
    cfg = lora_config(**overrides, **{"lora.base": str(base)})
    from flq.learning.tfimport import keras

    base_weights = keras().models.load_model(base, compile=False).get_weights()
    worker = build_trainer(cfg, "w1", 1)[0].trainer
    for ours, theirs in zip(frozen_weights(worker.model), base_weights, strict=True):
        np.testing.assert_array_equal(ours, theirs)  # every node's frozen base is the file's

    with_base = simulate(cfg, tmp_path / "base")
    on_random = simulate(lora_config(**overrides), tmp_path / "random")
    assert with_base.accuracy >= base_accuracy - 0.03  # adapters start at B = 0: the base itself
    assert with_base.accuracy > on_random.accuracy + 0.15
    rows = read_rounds(tmp_path / "base" / "rounds.csv")
    assert_final_model_scores(tmp_path / "base", cfg, rows[-1]["accuracy"])


def test_a_run_without_lora_leaves_the_final_model_too(tmp_path: Path) -> None:
    cfg = lora_config(**{"lora.rank": 0, "system.max_rounds": 2, "flq_algorithm.mode": "fedavg"})
    result = simulate(cfg, tmp_path)
    assert_final_model_scores(tmp_path, cfg, result.accuracy)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["state"] == "finished"
    assert summary["total_parameters"] == summary["exchanged_parameters"]
    assert summary["full_model_uplink_bytes_per_upload"] == summary["uplink_bytes_per_upload"]

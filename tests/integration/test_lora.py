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
from flq.master.checkpoint import load_checkpoint
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.federation import Federation, build_federation
from flq.master.results import read_rounds
from flq.types import TrainSpec
from flq.worker.training import build_trainer
from tests.loopback import connect_workers

pytestmark = pytest.mark.slow  # TensorFlow training

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
    assert summary["total_parameters"] == 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10 + exchanged
    per_upload = summary["uplink_bytes_per_upload"]
    uploads = sum(int(r["selected"]) for r in rows)
    assert per_upload == pytest.approx(sum(int(r["uplink_bits"]) for r in rows) / 8 / uploads)
    assert exchanged <= per_upload < 2 * exchanged  # 8 bits per adapter value plus headers
    full_model = summary["parameters"]  # what full-model federation would exchange
    assert full_model == summary["total_parameters"] - exchanged
    expected = per_upload * full_model / exchanged  # the same bits per value, all values
    assert summary["full_model_uplink_bytes_per_upload"] == pytest.approx(expected, abs=0.1)


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
    assert summary["demo"]["total_parameters"] == 64 * hidden + hidden + hidden * 10 + 10 + adapters
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

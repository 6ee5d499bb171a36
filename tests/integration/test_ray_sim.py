"""`flq simulate --ray` on a real Ray cluster of two nodes on 127.0.0.1 (tests/raycluster.py),
against the in-process simulation; and what `flq simulate` does without Ray.

The cluster tests (marker ray_cluster) run in `make test-ray`, apart from `make test`: starting
Ray takes minutes on a small loaded machine."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from flq.config import Config, default_config, with_overrides
from flq.errors import FlqError
from flq.master.results import read_rounds
from flq.sim import simulate
from tests.raycluster import free_ports, local_ray_cluster

SYNTHETIC = '[system]\ntotal_workers = 2\nmax_rounds = 2\n[dataset]\nname = "synthetic"\n'


def digits_config(**overrides: Any) -> Config:
    values = {
        "system.total_workers": 2,
        "system.min_workers": 2,
        "system.max_rounds": 3,
        "dataset.name": "digits",
        "dataset.batch_size": 32,
        "model.name": "mlp",
        "model.local_steps": 0,
        "model.local_epochs": 1,
        "model.lr": 0.1,
        "flq_algorithm.mode": "bbit",
        "flq_algorithm.b_up": 3,
        "flq_algorithm.b_down": 8,
        # Draws from each worker's generator: equal results need its seed in every process.
        "flq_algorithm.stochastic_rounding": True,
        "ray.num_cpus": 1,  # one worker per node: the nodes have one CPU each
        "ray.start_timeout_s": 240.0,
    }
    values.update(overrides)
    return with_overrides(default_config(), values)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with local_ray_cluster(nodes=2, cpus_per_node=1) as address:
        yield address


@pytest.mark.ray_cluster
def test_ray_workers_give_the_in_process_results(cluster: str, tmp_path: Path) -> None:
    cfg = digits_config()
    with capture_logs() as logs:
        on_ray = simulate(cfg, tmp_path / "ray", ray_address=cluster)
    placed = [e for e in logs if e["event"] == "ray workers running"]
    assert placed and placed[0]["nodes"] == 2 and placed[0]["workers"] == 2
    in_process = simulate(cfg, tmp_path / "memory")
    assert on_ray.rounds == in_process.rounds == 3
    ray_rows = read_rounds(tmp_path / "ray" / "rounds.csv")
    memory_rows = read_rounds(tmp_path / "memory" / "rounds.csv")
    assert len(ray_rows) == len(memory_rows) == 3
    for ray_row, memory_row in zip(ray_rows, memory_rows, strict=True):
        for exact in ("round", "selected", "skipped", "failed", "uplink_bits", "downlink_bits"):
            assert ray_row[exact] == memory_row[exact], (exact, ray_row, memory_row)
        for measured in ("accuracy", "loss"):
            assert float(ray_row[measured]) == pytest.approx(float(memory_row[measured]), abs=1e-5)
    assert on_ray.wire_bytes == in_process.wire_bytes
    assert float(ray_rows[-1]["accuracy"]) > 0.5  # it learned: the comparison is not of noise


@pytest.mark.ray_cluster
def test_a_worker_actor_killed_mid_run_fails_its_round_and_the_rest_carry_on(
    cluster: str, tmp_path: Path
) -> None:
    import ray

    def kill_w1_after_round_1(row: dict[str, Any]) -> None:
        if int(row["round"]) == 1:
            (name,) = [n for n in ray.util.list_named_actors() if n.endswith("-w1")]
            ray.kill(ray.get_actor(name))  # as a node or process lost: no restart

    cfg = digits_config(**{"system.max_rounds": 4})
    with capture_logs() as logs:
        result = simulate(
            cfg, tmp_path / "run", on_round=kill_w1_after_round_1, ray_address=cluster
        )
    assert result.rounds == 4  # the engine carried on to the end without w1
    rows = read_rounds(tmp_path / "run" / "rounds.csv")
    assert int(rows[0]["participants"]) == 2
    after = rows[1:]
    # w1 fails the round it was lost in (like a dropped daemon link), then is no longer asked
    assert any(row["failures"] == "w1:disconnected" for row in after), after
    assert int(after[-1]["participants"]) == 1 and after[-1]["fresh"] in ("w0", "")
    assert all("w1" not in row["fresh"] for row in after)
    lost = [e for e in logs if e["event"] == "simulated worker lost"]
    assert [e["worker"] for e in lost] == ["w1"]
    assert float(rows[-1]["accuracy"]) > 0.5  # w0 alone still trains the model


@pytest.mark.ray_cluster
def test_workers_the_cluster_cannot_place_are_named(cluster: str, tmp_path: Path) -> None:
    cfg = digits_config(**{"ray.num_gpus": 1.0, "ray.start_timeout_s": 5.0})
    with pytest.raises(FlqError, match=r"2 of 2 simulated workers not running after 5 s") as error:
        simulate(cfg, tmp_path / "run", ray_address=cluster)
    assert "w0, w1" in str(error.value) and "num_gpus=1" in str(error.value)
    assert "GPU=0" in str(error.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`flq` in a fresh interpreter; prints afterwards whether Ray was imported."""
    code = (
        "import sys\nfrom flq.cli.main import app\nsys.argv = ['flq', *sys.argv[1:]]\n"
        "try:\n    app()\nexcept SystemExit as end:\n"
        "    print('ray imported:', 'ray' in sys.modules)\n    raise\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_without_ray_the_simulation_never_imports_it(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(SYNTHETIC)
    result = run_cli("simulate", "-c", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "ray imported: False" in result.stdout
    assert len(read_rounds(tmp_path / "run" / "rounds.csv")) == 2


def test_an_address_where_no_cluster_listens_fails_fast(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(SYNTHETIC)
    (port,) = free_ports(1)
    result = run_cli("simulate", "-c", str(config), "--ray", f"127.0.0.1:{port}")
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"no Ray cluster at --ray 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr

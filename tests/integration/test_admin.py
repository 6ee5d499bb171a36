"""`flq status`, `flq stop`, `flq model pull`, `flq health` against real master daemons on loopback.

In-process tests run the master (and synthetic workers) on an event loop in a background thread
and drive the real `flq` CLI with typer's runner in the test's thread. The last test does what an
operator does: master and workers as processes with TLS, tokens and metrics, then the CLI as a
process, a Prometheus scrape, and a graceful stop.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs
from typer.testing import CliRunner

from flq import serde
from flq.cli.main import app
from flq.config import Config
from flq.demo import child_env, free_port
from flq.errors import EXIT_REFUSED, EXIT_UNREACHABLE
from flq.learning.data import DatasetSpec
from flq.master.checkpoint import load_checkpoint
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.federation import ModelEvaluation, build_federation
from flq.master.results import read_rounds
from flq.pb import flq_pb2 as pb
from flq.synthetic import SyntheticEvaluation, SyntheticProblem, SyntheticTrainer
from flq.types import ModelInfo, StatusReply, WorkerStatus
from tests.configs import small_config
from tests.loopback import connect_workers

PROBLEM = SyntheticProblem(dim=12, samples_per_worker=32, seed=7)
runner = CliRunner()


class DigitsLogreg:
    """A master-side model description for logreg on 8x8 digits, without loading TensorFlow."""

    spec = DatasetSpec("digits", (8, 8, 1), 10)
    parameters = 64 * 10 + 10

    def __init__(self) -> None:
        rng = np.random.default_rng(5)
        self.initial_weights = [
            rng.normal(size=(64, 10)).astype(np.float32),
            rng.normal(size=10).astype(np.float32),
        ]

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        return 2.0, 0.25


DIGITS_LOGREG = {"model.name": "logreg", "dataset.name": "digits"}  # with evaluation=DigitsLogreg


def config(**overrides: Any) -> Config:
    settings = {
        "system.total_workers": 2,
        "system.min_workers": 2,
        "system.max_rounds": 10_000,
        "dataset.name": "synthetic",
        "dataset.synthetic_train_s": 0.02,
        "flq_algorithm.b_down": 8,
        "lazy_selection.warmup": 1,
    }
    return small_config(settings, overrides)


class MasterThread:
    """A MasterDaemon and `workers` synthetic workers on an event loop in a background thread."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        workers: int = 0,
        evaluation: Callable[[], ModelEvaluation] = lambda: SyntheticEvaluation(PROBLEM),
    ) -> None:
        self.cfg, self.run_dir, self.workers, self.evaluation = cfg, run_dir, workers, evaluation
        self.ready = threading.Event()
        self.daemon: MasterDaemon | None = None
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), self.error
        assert self.daemon is not None

    @property
    def address(self) -> str:
        assert self.daemon is not None
        return f"127.0.0.1:{self.daemon.port}"

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as error:  # surfaced by the test through `error`
            self.error = error
            self.ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        evaluation = self.evaluation()
        daemon = MasterDaemon(
            self.cfg,
            MasterOptions(
                port=0,
                run_dir=self.run_dir,
                federation_factory=lambda c: build_federation(c, evaluation),
            ),
        )
        self.daemon = daemon
        master = asyncio.create_task(daemon.run())
        await daemon.ready.wait()
        stop = asyncio.Event()
        trainers = [SyntheticTrainer(PROBLEM, i) for i in range(self.workers)]
        workers = connect_workers(daemon.port, trainers, stop, backoff_cap_s=0.3)
        self.ready.set()
        try:
            await master
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)

    def wait_for(self, condition: Callable[[MasterDaemon], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.daemon):  # type: ignore[arg-type]
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def finish(self, timeout: float = 30) -> None:
        if self.thread.is_alive() and self.daemon is not None:
            self.loop.call_soon_threadsafe(self.daemon.request_stop, "test over")
        self.thread.join(timeout)
        assert not self.thread.is_alive()


@pytest.fixture
def masters() -> Iterator[list[MasterThread]]:
    started: list[MasterThread] = []
    yield started
    for master in started:
        master.finish()


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """No admin variables from the caller's shell; the master's logs captured, not printed into
    the CLI output the runner collects."""
    for name in ("FLQ_ADMIN_TOKEN", "FLQ_ADMIN_TOKEN_FILE", "FLQ_MASTER", "FLQ_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    with capture_logs() as logs:
        yield logs
    # `flq`'s callback configures structlog to print to the runner's (now closed) stream.
    structlog.reset_defaults()


def flq(*args: str) -> Any:
    return runner.invoke(app, list(args))


# ---------------------------------------------------------------- status


def test_status_reports_rounds_workers_and_the_model(
    masters: list[MasterThread], tmp_path: Path
) -> None:
    master = MasterThread(config(**{"budget_selection.up_budget_bits": 5000.0}), tmp_path, 2)
    masters.append(master)
    master.wait_for(lambda d: d.federation is not None and d.federation.state.round > 3)

    result = flq("status", "--master", master.address, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["round"] >= 3 and status["state"] == "training"
    assert status["mode"] == "bbit" and status["up_budget_bits"] == 5000
    assert 0 < status["last_round_uplink_bits"] <= 5000
    assert status["total_uplink_bits"] >= status["last_round_uplink_bits"]
    assert status["model"] == {
        "name": "mlp",
        "dataset": "synthetic",
        "hidden_units": 64,
        "input_shape": [],
        "num_classes": 0,
        "parameters": PROBLEM.dim + 1,
    }
    workers = {w["worker_id"]: w for w in status["workers"]}
    assert sorted(workers) == ["w0", "w1"]
    for worker in workers.values():
        assert worker["connected"] and worker["num_samples"] == PROBLEM.samples_per_worker
        assert 0 <= worker["last_seen_s"] < 10
        assert worker["uploads"] + worker["skips"] >= 3
    assert sum(w["uplink_bits"] for w in workers.values()) >= status["total_uplink_bits"] - 5000

    human = flq("status", "--master", master.address)
    assert human.exit_code == 0, human.output
    text = human.stdout
    assert f"master {master.address}" in text and "state training" in text
    assert "workers: 2 connected of 2" in text
    assert "w0" in text and "w1" in text and "s ago" in text
    assert "of 5 kbit budget" in text
    assert "weights from samples" in text
    assert status["weights_source"] == "samples"
    assert abs(sum(status["aggregation_weights"].values()) - 1.0) < 1e-6


def test_status_of_an_unreachable_master_names_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = flq("status", "--master", address, "--timeout", "3")
    assert result.exit_code == EXIT_UNREACHABLE
    assert f"cannot reach the master at {address}" in result.output


def test_a_bad_master_address_is_a_usage_error() -> None:
    result = flq("status", "--master", "no-port-here")
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_admin_token_is_required_when_the_master_has_one(
    masters: list[MasterThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLQ_ADMIN_TOKEN", "s3cret-admin-token")
    master = MasterThread(config(), tmp_path)
    masters.append(master)
    monkeypatch.delenv("FLQ_ADMIN_TOKEN")

    refused = flq("status", "--master", master.address)
    assert refused.exit_code == EXIT_REFUSED
    assert f"the master at {master.address} refused" in refused.output
    assert "UNAUTHENTICATED" in refused.output

    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-admin-token\n")
    token_file.chmod(0o600)
    accepted = flq("status", "--master", master.address, "--admin-token-file", str(token_file))
    assert accepted.exit_code == 0, accepted.output
    monkeypatch.setenv("FLQ_ADMIN_TOKEN", "s3cret-admin-token")
    assert flq("status", "--master", master.address, "--json").exit_code == 0


def test_status_over_mutual_tls(
    masters: list[MasterThread], certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, _, digest = (certs / "master.env").read_text().strip().partition("=")
    monkeypatch.setenv(name, digest)
    cfg = config(
        **{
            "security.tls_cert": str(certs / "server.pem"),
            "security.tls_key": str(certs / "server.key"),
            "security.tls_ca": str(certs / "ca.pem"),
            "security.require_client_cert": True,
            "security.tokens_file": str(certs / "tokens.txt"),
        }
    )
    master = MasterThread(cfg, tmp_path / "run")
    masters.append(master)
    monkeypatch.delenv(name)
    tls = ["--tls-ca", str(certs / "ca.pem")]
    client = ["--tls-cert", str(certs / "admin.pem"), "--tls-key", str(certs / "admin.key")]
    token = ["--admin-token-file", str(certs / "admin.token")]

    result = flq("status", "--master", master.address, "--json", *tls, *client, *token)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "waiting"
    no_cert = flq("status", "--master", master.address, "--timeout", "3", *tls, *token)
    assert no_cert.exit_code == EXIT_UNREACHABLE  # mutual TLS: the handshake itself fails
    no_tls = flq("status", "--master", master.address, "--timeout", "3", *token)
    assert no_tls.exit_code == EXIT_UNREACHABLE


# ---------------------------------------------------------------- health (container probes)


def test_health_is_serving_over_mutual_tls_and_not_once_stopped(
    masters: list[MasterThread], certs: Path, tmp_path: Path
) -> None:
    cfg = config(
        **{
            "security.tls_cert": str(certs / "server.pem"),
            "security.tls_key": str(certs / "server.key"),
            "security.tls_ca": str(certs / "ca.pem"),
            "security.require_client_cert": True,
        }
    )
    master = MasterThread(cfg, tmp_path / "run")
    masters.append(master)
    tls = ["--tls-ca", str(certs / "ca.pem")]
    client = ["--tls-cert", str(certs / "admin.pem"), "--tls-key", str(certs / "admin.key")]

    serving = flq("health", "--master", master.address, *tls, *client)
    assert serving.exit_code == 0, serving.output
    assert f"the master at {master.address} is serving" in serving.stdout
    no_cert = flq("health", "--master", master.address, "--timeout", "2", *tls)
    assert no_cert.exit_code == 1 and "not serving" in no_cert.stdout  # handshake refused
    master.finish()
    stopped = flq("health", "--master", master.address, "--timeout", "2", *tls, *client)
    assert stopped.exit_code == 1, stopped.output


# ---------------------------------------------------------------- stop


def test_stop_ends_the_round_writes_checkpoint_and_results(
    masters: list[MasterThread], tmp_path: Path
) -> None:
    master = MasterThread(config(), tmp_path, 2)
    masters.append(master)
    master.wait_for(lambda d: d.federation is not None and d.federation.state.round > 2)

    result = flq("stop", "--master", master.address, "--reason", "maintenance", "--wait")
    assert result.exit_code == 0, result.output
    assert "the master has stopped" in result.stdout
    master.thread.join(10)
    assert not master.thread.is_alive() and master.error is None
    daemon = master.daemon
    assert daemon is not None and daemon.state_name == "stopping"
    rows = read_rounds(tmp_path / "rounds.csv")
    completed = daemon.federation.state.round - 1  # type: ignore[union-attr]
    assert [int(r["round"]) for r in rows] == list(range(1, completed + 1))
    checkpoint = load_checkpoint(tmp_path / "checkpoint.npz")
    assert checkpoint["master"]["round"] == completed + 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == completed and summary["state"] == "stopping"
    gone = flq("stop", "--master", master.address, "--timeout", "2")
    assert gone.exit_code == EXIT_UNREACHABLE


# ---------------------------------------------------------------- model pull


def test_model_pull_writes_the_global_model_as_npz(
    masters: list[MasterThread], tmp_path: Path
) -> None:
    master = MasterThread(config(**DIGITS_LOGREG), tmp_path, evaluation=DigitsLogreg)
    masters.append(master)
    output = tmp_path / "global.npz"
    result = flq("model", "pull", "--master", master.address, "-o", str(output))
    assert result.exit_code == 0, result.output
    assert f"wrote {output} (round 0, 2 tensors, 650 values)" in result.stdout
    saved = load_checkpoint(output)
    for got, want in zip(saved["weights"], DigitsLogreg().initial_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert saved["name"] == "logreg" and saved["dataset"] == "digits"
    assert saved["input_shape"] == [8, 8, 1] and saved["num_classes"] == 10
    assert saved["round"] == 0 and saved["mode"] == "bbit"


def test_model_pull_refuses_keras_for_a_model_without_keras_form(
    masters: list[MasterThread], tmp_path: Path
) -> None:
    master = MasterThread(config(), tmp_path)
    masters.append(master)
    result = flq("model", "pull", "--master", master.address, "-o", str(tmp_path / "m.keras"))
    assert result.exit_code == 1 and "has no keras form" in result.output
    bad = flq("model", "pull", "--master", master.address, "-o", str(tmp_path / "m.h5"))
    assert bad.exit_code == 2 and ".npz or .keras" in bad.output


@pytest.mark.slow
def test_model_pull_rebuilds_the_keras_model_the_master_describes(
    masters: list[MasterThread], tmp_path: Path
) -> None:
    master = MasterThread(config(**DIGITS_LOGREG), tmp_path, evaluation=DigitsLogreg)
    masters.append(master)
    output = tmp_path / "global.keras"
    result = flq("model", "pull", "--master", master.address, "-o", str(output))
    assert result.exit_code == 0, result.output
    from flq.learning.tfimport import keras

    model = keras().models.load_model(output)
    assert tuple(model.input_shape[1:]) == (8, 8, 1) and model.output_shape[-1] == 10
    for got, want in zip(model.get_weights(), DigitsLogreg().initial_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    probabilities = model.predict(np.zeros((1, 8, 8, 1), np.float32), verbose=0)
    assert probabilities.shape == (1, 10) and abs(float(probabilities.sum()) - 1) < 1e-5


def test_model_info_travels_in_the_status_reply() -> None:
    status = StatusReply(
        round=2,
        max_rounds=9,
        state="training",
        accuracy=0.5,
        loss=1.0,
        up_budget_bits=0,
        last_round_uplink_bits=3,
        total_uplink_bits=4,
        total_downlink_bits=5,
        workers=(WorkerStatus("w0", True, 1.0, 2, 3, 4, 5, 6),),
        mode="bin",
        model=ModelInfo("cnn", "fashion-mnist", 128, (28, 28, 1), 10, 467_818),
    )
    wire = pb.StatusReply.FromString(serde.status_reply_to_proto(status).SerializeToString())
    back = serde.status_reply_from_proto(wire)
    assert back.model == status.model and back.workers == status.workers
    with pytest.raises(serde.WireError, match="input_shape"):
        serde.status_reply_from_proto(pb.StatusReply(model=pb.ModelInfo(input_shape=[1] * 9)))


# ---------------------------------------------------------------- as an operator runs it


def _env(**extra: str) -> dict[str, str]:
    env = child_env(**extra)
    for name in ("FLQ_ADMIN_TOKEN", "FLQ_MASTER", "FLQ_TLS_CA", "FLQ_METRICS_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def _spawn(module: str, args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_env(**env),
        )


def _flq_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flq.cli.main", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_operator_path_tls_status_metrics_and_graceful_stop(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    certs = tmp_path / "certs"
    assert (
        _flq_process(
            "certs", "init", str(certs), "--master-host", "127.0.0.1", "--workers", "w0,w1"
        ).returncode
        == 0
    )
    config_file = tmp_path / "master.toml"
    config_file.write_text(
        "[system]\ntotal_workers = 2\nmin_workers = 2\nmax_rounds = 100000\n"
        'round_timeout_s = 5.0\nmaster_url = "http://127.0.0.1:0"\n'
        '[dataset]\nname = "synthetic"\nsynthetic_train_s = 0.05\n'
        "[flq_algorithm]\nb_down = 8\n\n" + (certs / "security.toml").read_text()
    )
    port, metrics_port, run_dir = free_port(), free_port(), tmp_path / "run"
    admin_env = dict(line.split("=", 1) for line in (certs / "master.env").read_text().split())
    master = _spawn(
        "flq.cli.master",
        [
            *("run", "-c", str(config_file), "--port", str(port), "--run-dir", str(run_dir)),
            *("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"),
            *("--log-format", "json"),
        ],
        tmp_path / "master.log",
        **admin_env,
    )
    processes.append(master)
    for worker in ("w0", "w1"):
        processes.append(
            _spawn(
                "flq.cli.worker",
                [
                    *("run", "--master", f"127.0.0.1:{port}", "--worker-id", worker),
                    *("-c", str(config_file), "--tls-ca", str(certs / "ca.pem")),
                    *("--tls-cert", str(certs / f"{worker}.pem")),
                    *("--tls-key", str(certs / f"{worker}.key"), "--log-format", "json"),
                ],
                tmp_path / f"{worker}.log",
                FLQ_WORKER_TOKEN=(certs / f"{worker}.token").read_text().strip(),
            )
        )
    admin = [
        "--master",
        f"127.0.0.1:{port}",
        "--tls-ca",
        str(certs / "ca.pem"),
        "--tls-cert",
        str(certs / "admin.pem"),
        "--tls-key",
        str(certs / "admin.key"),
        "--admin-token-file",
        str(certs / "admin.token"),
    ]

    deadline = time.monotonic() + 90
    while True:
        result = _flq_process("status", "--json", *admin)
        status = json.loads(result.stdout) if result.returncode == 0 else {}
        if status.get("round", 0) >= 2 and all(w["connected"] for w in status["workers"]):
            break
        assert time.monotonic() < deadline, (result.stderr, (tmp_path / "master.log").read_text())
        time.sleep(0.5)
    assert sorted(w["worker_id"] for w in status["workers"]) == ["w0", "w1"]

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    assert "flq_master_workers_connected 2.0" in metrics
    assert "flq_master_rounds_total" in metrics and 'state="training"' in metrics

    stopped = _flq_process("stop", "--wait", *admin)
    assert stopped.returncode == 0, stopped.stderr
    assert master.wait(30) == 0
    assert (run_dir / "checkpoint.npz").exists() and (run_dir / "summary.json").exists()
    master_log = (tmp_path / "master.log").read_text()
    assert "stop requested" in master_log and "unencrypted" not in master_log
    for secret in ("admin.token", "w0.token", "w1.token"):
        assert (certs / secret).read_text().strip() not in master_log
    for worker in processes[1:]:
        worker.terminate()
        assert worker.wait(30) == 0

"""Prometheus metrics scraped over real HTTP from a real master daemon and a real worker.

The federation trains the numpy synthetic problem (no TensorFlow); workers connect over gRPC on
loopback. Values are read back with prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flq.config import default_config, with_overrides
from flq.grpc_options import CLIENT_OPTIONS
from flq.master.engine import RoundOutcome
from flq.metrics import MasterMetrics, MetricsServer, WorkerMetrics, record_board_stats
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.worker.connection import Backoff, run_connected
from flq.worker.session import SessionOptions, WorkerState
from tests.loopback import final_status, start_synthetic_master

PROBLEM = SyntheticProblem(dim=16, samples_per_worker=32, seed=3)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape_until(
    port: int, condition: Callable[[Samples], bool], timeout: float = 30.0
) -> Samples:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if condition(samples):
            return samples
        if loop.time() > deadline:
            raise AssertionError(f"metrics never satisfied the condition: {samples}")
        await asyncio.sleep(0.05)


async def send_malformed_session(port: int) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) as channel:
        call = pb_grpc.FLQStub(channel).Session()
        await call.write(pb.WorkerMessage())  # an empty oneof: malformed
        return await final_status(call)


def test_master_and_worker_metrics_move_with_rounds(tmp_path: Path) -> None:
    cfg = with_overrides(
        default_config(),
        {
            "system.total_workers": 3,
            "system.min_workers": 3,
            "system.max_rounds": 500,  # stopped by the test once it has seen enough
            "system.round_timeout_s": 5.0,
            "system.master_url": "http://127.0.0.1:0",
            "flq_algorithm.mode": "bbit",
            "flq_algorithm.b_down": 8,
            "lazy_selection.warmup": 1,
            "lazy_selection.thr_scale": 0.5,
            "budget_selection.up_budget_bits": 2000.0,
        },
    )
    worker_metrics = WorkerMetrics("w0")

    async def scenario() -> dict[str, Any]:
        daemon, master = await start_synthetic_master(
            cfg, tmp_path, PROBLEM, metrics_port=0, metrics_host="127.0.0.1"
        )
        assert daemon.metrics_server is not None
        port = daemon.metrics_server.port
        seen: dict[str, Any] = {"idle": await asyncio.to_thread(scrape, port)}
        assert await send_malformed_session(daemon.port) == grpc.StatusCode.INVALID_ARGUMENT
        seen["rejected"] = await asyncio.to_thread(scrape, port)

        worker_server = MetricsServer(worker_metrics.registry, 0, "127.0.0.1")
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(
                run_connected(
                    WorkerState(f"w{i}"),
                    SyntheticTrainer(PROBLEM, i),
                    f"127.0.0.1:{daemon.port}",
                    stop,
                    SessionOptions(heartbeat_interval_s=0.2),
                    Backoff(base_s=0.05, cap_s=0.3),
                    observer=worker_metrics if i == 0 else None,
                )
            )
            for i in range(3)
        ]
        rounds = "flq_master_rounds_total"
        seen["early"] = await scrape_until(port, lambda s: value(s, rounds) >= 2)
        later = value(seen["early"], rounds) + 3
        seen["late"] = await scrape_until(port, lambda s: value(s, rounds) >= later)
        seen["worker"] = await asyncio.to_thread(scrape, worker_server.port)
        daemon.request_stop("test over")
        await asyncio.wait_for(master, 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        seen["worker_after"] = await asyncio.to_thread(scrape, worker_server.port)
        worker_server.close()
        return seen

    seen = asyncio.run(scenario())
    idle, rejected, early, late = seen["idle"], seen["rejected"], seen["early"], seen["late"]

    assert value(idle, "flq_master_rounds_total") == 0
    assert value(idle, "flq_master_workers_connected") == 0
    assert value(idle, "flq_master_state", state="waiting") == 1
    assert value(idle, "flq_master_uplink_budget_bits") == 2000
    assert value(rejected, "flq_master_rejected_messages_total", reason="malformed") == 1

    assert value(late, "flq_master_workers_connected") == 3
    assert value(late, "flq_master_state", state="training") == 1
    for counter in (
        "flq_master_rounds_total",
        "flq_master_uplink_bits_total",
        "flq_master_downlink_bits_total",
        "flq_master_wire_bytes_total",
        "flq_master_round_duration_seconds_count",
        "flq_master_round_duration_seconds_sum",
    ):
        assert value(late, counter) > value(early, counter) > 0, counter
    assert value(late, "flq_master_round_duration_seconds_count") == value(
        late, "flq_master_rounds_total"
    )
    assert value(late, "flq_master_round") >= value(early, "flq_master_round") + 3
    assert value(late, "flq_master_round_workers", outcome="participants") == 3
    assert 0 <= value(late, "flq_master_accuracy") <= 1
    assert math.isfinite(value(late, "flq_master_loss"))
    assert 0 <= value(late, "flq_master_round_uplink_bits") <= 2000  # the budget holds
    outcomes = {
        o: value(late, "flq_master_worker_outcomes_total", outcome=o)
        for o in ("selected", "skipped", "denied", "failed")
    }
    assert outcomes["selected"] > 0 and outcomes["failed"] == 0
    assert outcomes["skipped"] + outcomes["denied"] > 0  # lazy rule or budget said no somewhere
    # Each round every worker is exactly one of selected / skipped / denied / failed.
    assert sum(outcomes.values()) == 3 * value(late, "flq_master_rounds_total")

    worker = seen["worker"]
    trained = value(worker, "flq_worker_rounds_trained_total")
    assert trained >= value(early, "flq_master_rounds_total")
    assert value(worker, "flq_worker_connected") == 1
    assert value(worker, "flq_worker_sent_bytes_total") > 0
    assert value(worker, "flq_worker_received_bytes_total") > 0
    assert value(worker, "flq_worker_uploads_total") > 0
    answered = value(worker, "flq_worker_uploads_total") + sum(
        value(worker, "flq_worker_skips_total", reason=r) for r in ("lazy", "denied")
    )
    assert trained - 1 <= answered <= trained  # the round in flight may still await its decision
    assert math.isfinite(value(worker, "flq_worker_train_loss"))
    assert value(worker, "flq_worker_last_train_seconds") > 0
    assert value(worker, "flq_worker_train_seconds_count") == trained
    assert value(seen["worker_after"], "flq_worker_connected") == 0


def test_board_stats_are_exported_in_base_units() -> None:
    metrics = WorkerMetrics("w3")
    record_board_stats(
        metrics,
        power_mw={"VDD_IN": 5120.0, "VDD_CPU_GPU_CV": math.nan},
        temperature_c={"CPU": 48.5, "GPU": 46.0},
        gpu_load_percent=37.0,
        ram_used_mb=2448,
        ram_total_mb=3956,
        unix_time=1_700_000_000.0,
    )
    server = MetricsServer(metrics.registry, 0, "127.0.0.1")
    try:
        samples = scrape(server.port)
    finally:
        server.close()
    assert value(samples, "flq_board_power_watts", rail="VDD_IN") == pytest.approx(5.12)
    assert ("flq_board_power_watts", (("rail", "VDD_CPU_GPU_CV"),)) not in samples  # NaN skipped
    assert value(samples, "flq_board_temperature_celsius", zone="GPU") == 46.0
    assert value(samples, "flq_board_gpu_load_ratio") == pytest.approx(0.37)
    assert value(samples, "flq_board_ram_used_bytes") == 2448 * 1024 * 1024
    assert value(samples, "flq_board_ram_total_bytes") == 3956 * 1024 * 1024
    assert value(samples, "flq_board_stats_updated_seconds") == 1_700_000_000.0
    assert value(samples, "flq_worker_info", worker_id="w3") == 1


def test_each_daemon_has_its_own_registry() -> None:
    first, second = MasterMetrics(), MasterMetrics()  # the global registry would refuse this

    outcome = RoundOutcome(
        round=1,
        participants=["w0", "w1"],
        fresh=["w0"],
        skipped=["w1"],
        uplink_bits=100,
        downlink_bits=200,
        wire_bytes=400,
        seconds=0.2,
        train_loss=0.5,
    )
    first.observe_round(outcome, 0.5, 1.0)
    assert first.registry.get_sample_value("flq_master_rounds_total") == 1
    assert second.registry.get_sample_value("flq_master_rounds_total") == 0
    assert first.registry.get_sample_value("flq_master_uplink_bits_total") == 100

"""Prometheus metrics for the master and the workers (prometheus-client, `--metrics-port`).

Every daemon owns its own `CollectorRegistry` (never the process-global one), so tests and the
simulator can run several daemons in one process. Values that already live in the daemon (who is
connected, the master's state) are read when Prometheus scrapes, not copied; per-round values are
recorded by `observe_round`, and refused calls and messages are counted here, by reason: the
servicer's refusals through `count_rejected`, the round engine's from each round's outcome.

The worker's numbers come from watching its link: every message it sends or receives passes an
`ObservedMasterLink`, so the session code stays unaware of metrics. Board gauges (power,
temperatures, GPU load, RAM) are fed by whoever reads tegrastats, through `record_board_stats`.
Units follow Prometheus conventions: seconds, bytes, watts, ratios in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flq.link import MasterLink, ReceivedByWorker
from flq.types import Decision, MasterMessage, UploadOffer, Welcome, WorkerMessage

# `_created` series double every counter's lines and mean nothing to a dashboard.
prometheus_client.disable_created_metrics()

MASTER_STATES = ("starting", "waiting", "training", "stopping", "finished")
ROUND_OUTCOMES = ("participants", "selected", "skipped", "denied", "failed", "refused")
# A round is one minibatch on a small board (~0.1 s) up to minutes of local epochs.
ROUND_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on a port of its own thread."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        server: WSGIServer
        server, self._thread = prometheus_client.start_http_server(port, host, registry=registry)
        self._server = server
        self.port: int = server.server_port
        self.host = host

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# ---------------------------------------------------------------- master


@dataclass(frozen=True)
class MasterSources:
    """Live values read at scrape time (callables, so the daemon can build its parts later)."""

    connected_workers: Callable[[], int] = lambda: 0
    state: Callable[[], str] = lambda: "starting"


class _MasterLive(Collector):
    def __init__(self, sources: MasterSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        yield _gauge(
            "flq_master_workers_connected",
            "Workers with a live session.",
            self.sources.connected_workers(),
        )
        state = GaugeMetricFamily(
            "flq_master_state", "The master's state (1 for the current one).", labels=["state"]
        )
        current = self.sources.state()
        for name in dict.fromkeys((*MASTER_STATES, current)):
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state


class FusionLike(Protocol):
    """A round's fusion step (flq.master.fusion.FusionRecord)."""

    @property
    def status(self) -> str: ...  # "" (not due), "applied" or "skipped:<reason>"

    @property
    def loss(self) -> float: ...

    @property
    def seconds(self) -> float: ...


class RoundLike(Protocol):
    """What observe_round reads from a round's outcome (flq.master.outcome.RoundOutcome)."""

    round: int
    participants: list[str]
    fresh: list[str]
    skipped: list[str]
    denied: dict[str, str]
    failed: dict[str, str]
    rejected: dict[str, str]
    refused: dict[str, str]
    uplink_bits: int
    downlink_bits: int
    wire_bytes: int
    seconds: float
    train_loss: float

    @property
    def fusion(self) -> FusionLike: ...


class MasterMetrics:
    def __init__(self, sources: MasterSources | None = None, up_budget_bits: float = 0.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("flq_master_rounds", "Rounds completed.", registry=r)
        self.round = Gauge("flq_master_round", "The last completed round.", registry=r)
        self.accuracy = Gauge(
            "flq_master_accuracy", "Test accuracy of the global model.", registry=r
        )
        self.loss = Gauge("flq_master_loss", "Test loss of the global model.", registry=r)
        self.train_loss = Gauge(
            "flq_master_train_loss",
            "Sample-weighted training loss the workers reported.",
            registry=r,
        )
        self.uplink_bits = Counter(
            "flq_master_uplink_bits", "Encoded update bits received (packed + headers).", registry=r
        )
        self.downlink_bits = Counter(
            "flq_master_downlink_bits", "Encoded model bits sent to workers.", registry=r
        )
        self.wire_bytes = Counter(
            "flq_master_wire_bytes",
            "Serialized bytes of every round message, both ways.",
            registry=r,
        )
        self.round_uplink_bits = Gauge(
            "flq_master_round_uplink_bits", "Uplink bits of the last round.", registry=r
        )
        self.up_budget_bits = Gauge(
            "flq_master_uplink_budget_bits",
            "Uplink bits granted per round; 0 = no budget.",
            registry=r,
        )
        self.up_budget_bits.set(up_budget_bits)
        self.round_workers = Gauge(
            "flq_master_round_workers",
            "Workers of the last round by outcome.",
            ["outcome"],
            registry=r,
        )
        self.worker_outcomes = Counter(
            "flq_master_worker_outcomes",
            "Worker-rounds by outcome (selected, skipped = lazy, denied = budget or late, failed; "
            "refused = an upload refused by screening or a non-finite step, also failed).",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "flq_master_rejected_messages",
            "Calls and messages refused, by reason (malformed, auth, protocol status code).",
            ["reason"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "flq_master_round_duration_seconds",
            "Wall time of a round, model out to step applied.",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=r,
        )
        self.fusions = Counter(
            "flq_master_fusions",
            "Fusion steps by result (applied, skipped: an error or a non-finite result).",
            ["result"],
            registry=r,
        )
        self.fusion_seconds = Histogram(
            "flq_master_fusion_duration_seconds",
            "Wall time of a fusion step in the master (teacher knowledge into the model).",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=r,
        )
        self.fusion_loss = Gauge(
            "flq_master_fusion_loss", "Server-side loss of the last fusion step.", registry=r
        )
        self.fusion_loss.set(math.nan)
        for result in ("applied", "skipped"):
            self.fusions.labels(result)
        for outcome in ROUND_OUTCOMES:
            self.round_workers.labels(outcome).set(0)
            if outcome != "participants":
                self.worker_outcomes.labels(outcome)
        self.accuracy.set(math.nan)
        self.loss.set(math.nan)
        self.train_loss.set(math.nan)
        r.register(_MasterLive(sources or MasterSources()))

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def rejected_count(self, reason: str) -> int:
        """How many calls or messages were refused for `reason` so far."""
        value = self.registry.get_sample_value(
            "flq_master_rejected_messages_total", {"reason": reason}
        )
        return int(value or 0)

    def observe_round(self, outcome: RoundLike, accuracy: float, loss: float) -> None:
        for code in outcome.rejected.values():
            self.count_rejected(code)
        self.rounds.inc()
        self.round.set(outcome.round)
        self.accuracy.set(accuracy)
        self.loss.set(loss)
        self.train_loss.set(outcome.train_loss)
        self.uplink_bits.inc(outcome.uplink_bits)
        self.downlink_bits.inc(outcome.downlink_bits)
        self.wire_bytes.inc(outcome.wire_bytes)
        self.round_uplink_bits.set(outcome.uplink_bits)
        self.round_seconds.observe(outcome.seconds)
        counts = {
            "participants": len(outcome.participants),
            "selected": len(outcome.fresh),
            "skipped": len(outcome.skipped),
            "denied": len(outcome.denied),
            "failed": len(outcome.failed),
            "refused": len(outcome.refused),  # uploads refused (screen, non-finite step)
        }
        for name, count in counts.items():
            self.round_workers.labels(name).set(count)
            if name != "participants":
                self.worker_outcomes.labels(name).inc(count)
        self._observe_fusion(outcome.fusion)

    def _observe_fusion(self, fusion: FusionLike) -> None:
        if not fusion.status:
            return
        self.fusions.labels("applied" if fusion.status == "applied" else "skipped").inc()
        self.fusion_seconds.observe(fusion.seconds)
        self.fusion_loss.set(fusion.loss)


# ---------------------------------------------------------------- worker


class LinkObserver(Protocol):
    """Told about every message on a worker's link (WorkerMetrics is one)."""

    def on_sent(self, message: WorkerMessage, wire_bytes: int) -> None: ...

    def on_received(self, message: MasterMessage, wire_bytes: int) -> None: ...

    def on_closed(self) -> None: ...


class ObservedMasterLink:
    """Wraps a MasterLink and reports each message to an observer; changes nothing else."""

    def __init__(self, link: MasterLink, observer: LinkObserver) -> None:
        self._link = link
        self._observer = observer

    async def send(self, message: WorkerMessage) -> int:
        size = await self._link.send(message)
        self._observer.on_sent(message, size)
        return size

    async def recv(self) -> ReceivedByWorker:
        received = await self._link.recv()
        self._observer.on_received(received.message, received.wire_bytes)
        return received


class WorkerMetrics:
    def __init__(self, worker_id: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge("flq_worker_info", "This worker (value 1).", ["worker_id"], registry=r)
        self.info.labels(worker_id).set(1)
        self.connected = Gauge(
            "flq_worker_connected", "1 while a session with the master is up.", registry=r
        )
        self.round = Gauge("flq_worker_round", "The round last trained.", registry=r)
        self.rounds_trained = Counter(
            "flq_worker_rounds_trained", "Rounds trained (offers sent).", registry=r
        )
        self.uploads = Counter("flq_worker_uploads", "Uploads the master granted.", registry=r)
        self.skips = Counter(
            "flq_worker_skips",
            "Rounds without an upload: lazy (the rule said skip) or denied (budget).",
            ["reason"],
            registry=r,
        )
        self.train_loss = Gauge("flq_worker_train_loss", "Last local training loss.", registry=r)
        self.last_train_seconds = Gauge(
            "flq_worker_last_train_seconds", "Wall time of the last round's training.", registry=r
        )
        self.train_seconds = Histogram(
            "flq_worker_train_seconds",
            "Wall time of each round's local training.",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "flq_worker_sent_bytes", "Serialized bytes sent to the master.", registry=r
        )
        self.received_bytes = Counter(
            "flq_worker_received_bytes", "Serialized bytes received from the master.", registry=r
        )
        self.upload_bits = Counter(
            "flq_worker_upload_bits", "Encoded update bits offered in granted uploads.", registry=r
        )
        for reason in ("lazy", "denied"):
            self.skips.labels(reason)
        self.train_loss.set(math.nan)
        self.last_train_seconds.set(math.nan)
        self.board = BoardGauges(r)
        self._wanted_upload = False
        self._offered_bits = 0

    # LinkObserver
    def on_sent(self, message: WorkerMessage, wire_bytes: int) -> None:
        self.sent_bytes.inc(wire_bytes)
        if isinstance(message, UploadOffer):
            self.rounds_trained.inc()
            self.round.set(message.round)
            self.train_loss.set(message.train_loss)
            self.last_train_seconds.set(message.train_seconds)
            self.train_seconds.observe(message.train_seconds)
            self._wanted_upload = message.wants_upload
            self._offered_bits = message.cost_bits

    def on_received(self, message: MasterMessage, wire_bytes: int) -> None:
        self.received_bytes.inc(wire_bytes)
        if isinstance(message, Welcome):
            self.connected.set(1)
        elif isinstance(message, Decision):
            if message.granted:
                self.uploads.inc()
                self.upload_bits.inc(self._offered_bits)
            else:
                self.skips.labels("denied" if self._wanted_upload else "lazy").inc()

    def on_closed(self) -> None:
        self.connected.set(0)


# ---------------------------------------------------------------- board (tegrastats)


class BoardGauges:
    """Jetson board gauges; values arrive through record_board_stats."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.power = Gauge(
            "flq_board_power_watts", "Instant power per rail (tegrastats).", ["rail"], registry=r
        )
        self.temperature = Gauge(
            "flq_board_temperature_celsius", "Temperature per zone.", ["zone"], registry=r
        )
        self.gpu_load = Gauge("flq_board_gpu_load_ratio", "GPU (GR3D) load, 0..1.", registry=r)
        self.ram_used = Gauge("flq_board_ram_used_bytes", "RAM in use.", registry=r)
        self.ram_total = Gauge("flq_board_ram_total_bytes", "RAM installed.", registry=r)
        self.updated = Gauge(
            "flq_board_stats_updated_seconds", "Unix time of the last board reading.", registry=r
        )


_MIB = 1024 * 1024


def record_board_stats(
    metrics: WorkerMetrics,
    *,
    power_mw: Mapping[str, float] | None = None,
    temperature_c: Mapping[str, float] | None = None,
    gpu_load_percent: float | None = None,
    ram_used_mb: float | None = None,
    ram_total_mb: float | None = None,
    unix_time: float | None = None,
) -> None:
    """Feed one tegrastats reading (its own units: mW, °C, %, MB) into a worker's gauges.

    Anything None or non-finite is left as it was, so a board that lacks a rail or a sensor simply
    does not export it.
    """
    board = metrics.board
    for rail, milliwatts in (power_mw or {}).items():
        if _finite(milliwatts):
            board.power.labels(rail).set(milliwatts / 1000.0)
    for zone, celsius in (temperature_c or {}).items():
        if _finite(celsius):
            board.temperature.labels(zone).set(celsius)
    if gpu_load_percent is not None and _finite(gpu_load_percent):
        board.gpu_load.set(gpu_load_percent / 100.0)
    if ram_used_mb is not None and _finite(ram_used_mb):
        board.ram_used.set(ram_used_mb * _MIB)
    if ram_total_mb is not None and _finite(ram_total_mb):
        board.ram_total.set(ram_total_mb * _MIB)
    if unix_time is not None:
        board.updated.set(unix_time)
    else:
        board.updated.set_to_current_time()


__all__ = [
    "LinkObserver",
    "MasterMetrics",
    "MasterSources",
    "MetricsServer",
    "ObservedMasterLink",
    "WorkerMetrics",
    "record_board_stats",
]

"""Domain messages shared by master and worker: frozen dataclasses, no protobuf here.

Each class mirrors one message of proto/flq/v1/flq.proto; flq/serde.py is the only place that
converts between the two. Field names follow the proto so the mapping stays obvious.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import numpy as np

from flq.codec.chunks import TensorChunk

PROTOCOL_VERSION = 2  # Hello and Welcome carry it; a master refuses any other
# 2: the grid codecs may arrive under bzip2 (BLOCK_GRID_BZ2, LAQ_GRID_BZ2), which a 1 cannot decode
OPTIMIZERS: Final = ("sgd", "adam")  # local optimizers a worker can train with

__all__ = [
    "OPTIMIZERS",
    "PROTOCOL_VERSION",
    "Decision",
    "DeviceInfo",
    "EvalResult",
    "Heartbeat",
    "Hello",
    "Location",
    "MasterMessage",
    "ModelChunk",
    "ModelIdentity",
    "ModelInfo",
    "ResetReference",
    "RoundConfig",
    "RoundStart",
    "Shutdown",
    "Skip",
    "StatusReply",
    "TensorChunk",
    "TrainResult",
    "TrainSpec",
    "UpdateChunk",
    "UploadOffer",
    "Welcome",
    "WorkerMessage",
    "WorkerStatus",
]


@dataclass(frozen=True)
class DeviceInfo:
    hostname: str = ""
    platform: str = ""
    accelerator: str = ""
    memory_mb: int = 0
    python: str = ""
    flq_version: str = ""


@dataclass(frozen=True)
class Location:
    """Where a worker stands: coordinates, a site label, or both (all optional)."""

    latitude: float | None = None
    longitude: float | None = None
    site: str = ""


@dataclass(frozen=True)
class RoundConfig:
    """What the master dictates for one round; workers follow it, not their own file."""

    mode: str = "bbit"
    b_up: int = 4
    b_down: int = 32
    local_steps: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    l2: float = 0.0
    prox_mu: float = 0.0
    thr_scale: float = 0.0
    lazy_d: int = 10
    lazy_ck: float = 0.8
    lazy_c: int = 50
    warmup: int = 5
    stochastic_rounding: bool = False
    error_feedback: bool = True
    deadline_ms: int = 60_000
    optimizer: str = "sgd"
    bbit_block: int = 0  # bbit: 0 = LAQ grid per tensor, N = block grid with N values per radius
    density: float = 0.01  # stc: fraction of the update's values each upload keeps
    gap_code: str = "best"  # stc, sti: "golomb" (the paper's) or "best" (also gap classes)
    sparse_scope: str = "tensor"  # stc, sti: top p of each tensor ("tensor") or of the model


# ---------------------------------------------------------------- worker -> master


@dataclass(frozen=True)
class ModelIdentity:
    """A model's architecture (flq/learning/architecture.py): a hex digest and a short
    description for messages. Empty: a model without a Keras form, not checked."""

    digest: str = ""
    description: str = ""

    def __str__(self) -> str:
        return f"{self.digest} ({self.description})" if self.digest else "(none)"


@dataclass(frozen=True)
class Hello:
    worker_id: str
    protocol_version: int
    num_samples: int
    device: DeviceInfo = field(default_factory=DeviceInfo)
    location: Location = field(default_factory=Location)
    upload_ref_version: int = 0
    download_ref_version: int = 0
    # Optional traffic/usage numbers the board reports; an LLM weighting reads them.
    features: dict[str, float] = field(default_factory=dict)
    model: ModelIdentity = field(default_factory=ModelIdentity)  # the master refuses another


@dataclass(frozen=True)
class UploadOffer:
    round: int
    wants_upload: bool
    cost_bits: int
    energy: float
    clock: int
    forced: bool
    train_loss: float = 0.0
    num_samples: int = 0
    train_seconds: float = 0.0  # wall time of the round's local training


@dataclass(frozen=True)
class UpdateChunk:
    round: int
    upload_ref_version: int
    tensors: tuple[TensorChunk, ...]


@dataclass(frozen=True)
class Skip:
    round: int
    reason: str


@dataclass(frozen=True)
class EvalResult:
    round: int
    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class Heartbeat:
    round: int
    phase: str
    unix_time: float


# ---------------------------------------------------------------- master -> worker


@dataclass(frozen=True)
class Welcome:
    worker_id: str
    protocol_version: int
    session_id: str
    round: int
    reset_references: bool
    upload_ref_version: int
    download_ref_version: int


@dataclass(frozen=True)
class RoundStart:
    """One part of a round's start; the downlink model is spread over parts 0..parts-1."""

    round: int
    config: RoundConfig
    lazy_scalar: float
    download_ref_version: int
    part: int
    parts: int
    tensors: tuple[TensorChunk, ...]


@dataclass(frozen=True)
class Decision:
    round: int
    granted: bool
    reason: str
    upload_ref_version: int


@dataclass(frozen=True)
class ResetReference:
    round: int
    reason: str
    upload_ref_version: int
    download_ref_version: int


@dataclass(frozen=True)
class Shutdown:
    round: int
    reason: str
    reconnect: bool
    reconnect_after_ms: int = 0


# ---------------------------------------------------------------- admin


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    connected: bool
    last_seen_unix: float
    num_samples: int
    uplink_bits: int
    uploads: int
    skips: int
    failures: int


@dataclass(frozen=True)
class ModelInfo:
    """The global model's architecture, enough for a client to rebuild it (`flq model pull`)."""

    name: str = ""
    dataset: str = ""
    hidden_units: int = 0
    input_shape: tuple[int, ...] = ()  # empty: the model has no keras form (synthetic)
    num_classes: int = 0
    parameters: int = 0


@dataclass(frozen=True)
class StatusReply:
    round: int
    max_rounds: int
    state: str
    accuracy: float
    loss: float
    up_budget_bits: int
    last_round_uplink_bits: int
    total_uplink_bits: int
    total_downlink_bits: int
    workers: tuple[WorkerStatus, ...]
    mode: str
    model: ModelInfo = field(default_factory=ModelInfo)
    aggregation_weights: dict[str, float] = field(default_factory=dict)  # last round, normalised
    weights_source: str = ""  # samples | uniform | llm | cache | fallback:<reason>
    llm_confidence: float = math.nan
    llm_reasoning: str = ""


@dataclass(frozen=True)
class ModelChunk:
    round: int
    tensors: tuple[TensorChunk, ...]


WorkerMessage: TypeAlias = Hello | UploadOffer | UpdateChunk | Skip | EvalResult | Heartbeat
MasterMessage: TypeAlias = Welcome | RoundStart | Decision | ResetReference | Shutdown | Heartbeat


# ---------------------------------------------------------------- local training (worker side)


@dataclass(frozen=True)
class TrainSpec:
    """One round's local work: `local_steps` minibatches, or `local_epochs` passes if steps is 0."""

    local_steps: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    l2: float = 0.0
    prox_mu: float = 0.0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.local_steps < 0:
            raise ValueError(f"local_steps: got {self.local_steps}, expected >= 0 (0 = epochs)")
        if self.local_steps == 0 and self.local_epochs < 1:
            raise ValueError(f"local_epochs: got {self.local_epochs}, expected >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: got {self.batch_size}, expected >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: got {self.lr}, expected a finite value > 0")
        for name, value in (("l2", self.l2), ("prox_mu", self.prox_mu)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: got {value}, expected a finite value >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer: got {self.optimizer!r}, expected one of {list(OPTIMIZERS)}"
            )


@dataclass(frozen=True)
class TrainResult:
    delta: list[np.ndarray]  # w_end - w_start, float32, in exchanged-weights order (see lora.py)
    loss: float  # mean of the objective over the steps taken
    num_samples: int  # size of this worker's partition (the FedAvg weight)
    steps: int
    seconds: float

"""What one round did: the record the engine fills and the driver, bookkeeper, registry and
metrics read. Its own module so that none of those readers has to import the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flq.master.fusion import FusionRecord


@dataclass
class RoundOutcome:
    round: int
    participants: list[str] = field(default_factory=list)
    # Fresh uploads: granted, received whole and stored this round (the algorithm's "fresh", as
    # opposed to stale reuse). rounds.csv and the metrics keep their column name "selected".
    fresh: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # lazy: did not want to upload
    denied: dict[str, str] = field(default_factory=dict)  # wanted, but budget/top-k said no
    failed: dict[str, str] = field(default_factory=dict)  # worker -> why
    rejected: dict[str, str] = field(default_factory=dict)  # worker -> protocol status code
    refused: dict[str, str] = field(default_factory=dict)  # worker -> why its upload was refused
    upload_bits: dict[str, int] = field(default_factory=dict)  # worker -> bits it uploaded
    train_losses: dict[str, float] = field(default_factory=dict)  # worker -> loss it offered
    train_seconds: dict[str, float] = field(default_factory=dict)  # worker -> its training time
    uplink_bits: int = 0
    downlink_bits: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    train_loss: float = float("nan")
    lazy_scalar: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)
    weights_source: str = "samples"  # samples | uniform | llm | cache | fallback:<reason>
    llm_confidence: float = math.nan
    llm_reasoning: str = ""
    fusion: FusionRecord = field(default_factory=FusionRecord)  # the fusion step, if any

"""What happens after each round, for the daemon and the simulator alike: evaluate, checkpoint,
write the results row, log one line; and the run's totals and closing summary."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import structlog

from flq.master.checkpoint import load_checkpoint, save_checkpoint
from flq.master.federation import Federation
from flq.master.outcome import RoundOutcome
from flq.master.results import ResultsWriter, round_row

log = structlog.get_logger("flq.master")
TOTAL_KEYS = ("uplink_bits", "downlink_bits", "wire_bytes")


class RoundBookkeeper:
    """Keeps the run's records: running totals, the last accuracy and loss, the checkpoint,
    rounds.csv and summary.json. `finish_round` is called once per round, after the engine."""

    def __init__(
        self,
        federation: Federation,
        run_dir: Path,
        *,
        resume: bool = False,
        checkpoints: bool = True,
    ) -> None:
        self.federation = federation
        self.run_dir = run_dir
        self.checkpoint_path = run_dir / "checkpoint.npz" if checkpoints else None
        self.totals = dict.fromkeys(TOTAL_KEYS, 0)
        self.last_accuracy = math.nan
        self.last_loss = math.nan
        self.last_outcome: RoundOutcome | None = None
        if resume:
            self._resume()
        self.results = ResultsWriter(run_dir, resume=resume)

    def _resume(self) -> None:
        if self.checkpoint_path is None:
            raise ValueError("resume needs checkpoints")
        saved = load_checkpoint(self.checkpoint_path)
        self.federation.state.load_state(saved["master"])
        self.totals.update({k: int(v) for k, v in saved.get("totals", {}).items()})
        self.last_accuracy = float(saved.get("accuracy", math.nan))
        self.last_loss = float(saved.get("loss", math.nan))
        log.info(
            "resumed from checkpoint",
            path=str(self.checkpoint_path),
            next_round=self.federation.state.round,
        )

    async def finish_round(self, outcome: RoundOutcome) -> dict[str, Any]:
        fed = self.federation
        if fed.should_evaluate(outcome.round):
            self.last_loss, self.last_accuracy = await asyncio.to_thread(
                fed.evaluate, fed.state.weights
            )
        for key in TOTAL_KEYS:
            self.totals[key] += getattr(outcome, key)
        self.last_outcome = outcome
        self.save()
        row = round_row(
            outcome, self.last_accuracy, self.last_loss, cum_uplink_bits=self.totals["uplink_bits"]
        )
        self.results.write(row)
        log.info(
            "round",
            round=outcome.round,
            accuracy=row["accuracy"],
            loss=row["loss"],
            selected=row["selected"],
            skipped=row["skipped"],
            failed=row["failed"],
            uplink_bits=row["uplink_bits"],
            wire_bytes=row["wire_bytes"],
            seconds=row["seconds"],
        )
        return row

    def save(self) -> None:
        if self.checkpoint_path is None:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "master": self.federation.state.state(),
                "totals": dict(self.totals),
                "accuracy": self.last_accuracy,
                "loss": self.last_loss,
            },
        )

    def write_summary(self, state: str, seconds: float) -> None:
        """summary.json: the run's totals and sizes, written once at the end."""
        fed = self.federation
        summary = {
            "rounds": fed.state.round - 1,
            "state": state,
            "accuracy": self.last_accuracy,
            "loss": self.last_loss,
            "parameters": fed.parameters,
            **self.totals,
            "mode": fed.cfg.flq_algorithm.mode,
            "seconds": seconds,
            **fed.size_summary(self.totals["uplink_bits"]),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        self.results.close()

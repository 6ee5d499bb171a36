"""What happens after each round, for the daemon and the simulator alike: evaluate, checkpoint,
write the results row, log one line; and the run's totals and closing summary."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import structlog

from flq.master.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from flq.master.federation import Federation
from flq.master.outcome import RoundOutcome
from flq.master.results import ROUNDS_CSV, ResultsWriter, reconcile_rounds, round_row

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
        checkpoint_every: int = 1,
    ) -> None:
        self.federation = federation
        self.run_dir = run_dir
        self.checkpoint_path = run_dir / CHECKPOINT_NAME if checkpoints else None
        self.checkpoint_every = checkpoint_every
        self.totals = dict.fromkeys(TOTAL_KEYS, 0)
        self.last_accuracy = math.nan
        self.last_loss = math.nan
        self.last_outcome: RoundOutcome | None = None
        self._last_row: dict[str, str] | None = None  # travels in the checkpoint
        if resume:
            self._resume()
        self.results = ResultsWriter(run_dir, resume=resume)

    def _resume(self) -> None:
        if self.checkpoint_path is None:
            raise ValueError("resume needs checkpoints")
        saved = load_checkpoint(self.checkpoint_path)
        try:
            self.federation.state.restore(saved["master"])
        except (KeyError, ValueError) as error:  # another model, mode or an older format
            raise CheckpointError(
                f"{self.checkpoint_path}: cannot resume from it: {error}"
            ) from None
        self.totals.update({k: int(v) for k, v in saved.get("totals", {}).items()})
        self.last_accuracy = float(saved.get("accuracy", math.nan))
        self.last_loss = float(saved.get("loss", math.nan))
        self._last_row = saved.get("last_row")
        next_round = self.federation.state.round
        reconcile_rounds(self.run_dir / ROUNDS_CSV, next_round, self._last_row)
        log.info("resumed from checkpoint", path=str(self.checkpoint_path), next_round=next_round)

    async def finish_round(self, outcome: RoundOutcome) -> dict[str, Any]:
        fed = self.federation
        if fed.should_evaluate(outcome.round):
            self.last_loss, self.last_accuracy = await asyncio.to_thread(
                fed.evaluate, fed.state.weights
            )
            fed.engine.progress.evaluated(outcome.round, self.last_accuracy, self.last_loss)
        for key in TOTAL_KEYS:
            self.totals[key] += getattr(outcome, key)
        self.last_outcome = outcome
        row = round_row(
            outcome, self.last_accuracy, self.last_loss, cum_uplink_bits=self.totals["uplink_bits"]
        )
        self._last_row = {key: str(value) for key, value in row.items()}
        if self.checkpoint_path is not None and outcome.round % self.checkpoint_every == 0:
            # Snapshot here, on the loop (the next round may change the state); write and fsync
            # in a thread so heartbeats, keepalives and watchdog pings keep their time. The row
            # follows the checkpoint, which carries it: a kill between the two loses nothing
            # (reconcile_rounds puts it back on --resume).
            await asyncio.to_thread(save_checkpoint, self.checkpoint_path, self._snapshot())
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
            slowest_train_s=row["train_s_max"],
        )
        return row

    def save(self) -> None:
        """Write the checkpoint now (the final one at shutdown), on the calling thread."""
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self._snapshot())

    def _snapshot(self) -> dict[str, Any]:
        """The checkpoint's content, copied: the arrays are the state's own copies."""
        snapshot: dict[str, Any] = {
            "master": self.federation.state.snapshot(),
            "totals": dict(self.totals),
            "accuracy": self.last_accuracy,
            "loss": self.last_loss,
            "run": run_identity(self.federation.cfg),
        }
        if self._last_row is not None:
            snapshot["last_row"] = dict(self._last_row)
        return snapshot

    def write_model(self) -> list[Path]:
        """The final model into the results directory (model.npz, model.keras: with LoRA the
        base with the adapters folded in), on the calling thread. Returns the files written."""
        files = self.federation.write_model(self.run_dir)
        log.info("final model written", files=[str(f) for f in files])
        return files

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
        advisor = fed.advisor_summary()
        if advisor is not None:
            summary["weight_advisor"] = advisor
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        self.results.close()

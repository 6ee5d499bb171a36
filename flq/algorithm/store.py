"""The master's copy of every worker's upload reference (its stored contribution Q_i).

Q_i moves with the same float32 arithmetic the worker uses for Q_hat, so the two stay
bit-identical: innovation modes add the decoded dQ, raw modes replace Q_i by the decoded payload.
A worker that did not upload this round keeps its Q_i, which keeps counting in the aggregate
(stale reuse) — except in modes whose contributions count only in their own round (stc,
`reuses_stale`). A worker with no upload since it joined or was reset has no contribution at all:
its Q_i is zero, and counting it would only drag the mean towards zero.

Stale reuse is bounded: a contribution stops counting once its worker has been absent (no offer
in the round) for more than `max_absent` rounds in a row, and counts again when it is back — its
Q_i is kept, so a returning worker needs no reset. A refused upload resets the worker: nothing it
stored before is reused either.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flq.algorithm._arrays import Shapes, check_finite, zeros
from flq.algorithm.modes import Mode, check_upload, is_innovation, parse_mode, reuses_stale
from flq.algorithm.robust import norm
from flq.algorithm.screening import ScreenOptions, screen_norms
from flq.codec import EncodedTensor, decode


@dataclass
class _Entry:
    contribution: list[np.ndarray] | None = None  # None: nothing uploaded since join/reset
    version: int = 0  # +1 per applied upload, in step with the worker's reference
    weight_used: float = 0.0  # sum of the aggregation weights this worker has received
    norm: float = 0.0  # ||Q_i||, kept for screening and for finding the culprit of a bad step
    absent: int = 0  # rounds in a row without an offer from this worker
    # ||Q_i - Q_i before its last upload|| / ||Q_i before||: how much its last upload moved it
    # (None: a first upload, or Q_i was 0). Not checkpointed: unknown again after a restart.
    change: float | None = None


class ContributionStore:
    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        mode: Mode,
        b_up: int = 4,
        bbit_block: int = 0,
        max_absent: int | None = None,  # None: counts however long its worker is gone
        density: float = 1.0,
        gap_classes: bool = True,
        per_tensor: bool = True,
    ) -> None:
        self.shapes: Shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self.mode = mode
        self.b_up = b_up
        self.bbit_block = bbit_block
        self.max_absent = max_absent
        self.density = density  # stc: the most values an upload may keep, as a fraction
        self.gap_classes = gap_classes  # stc, sti: False = Golomb-Rice only
        self.per_tensor = per_tensor  # stc, sti: the density holds per tensor, not per model
        self._entries: dict[str, _Entry] = {}

    # ------------------------------------------------------------ queries

    def version(self, worker_id: str) -> int:
        """The worker's reference version as the master sees it (0 for a stranger)."""
        entry = self._entries.get(worker_id)
        return 0 if entry is None else entry.version

    def contribution(self, worker_id: str) -> list[np.ndarray] | None:
        """Q_i (the arrays themselves: read, do not modify), or None if there is none."""
        entry = self._entries.get(worker_id)
        return None if entry is None else entry.contribution

    def contributors(self, fresh: Collection[str] = ()) -> list[str]:
        """Workers whose Q_i counts in the aggregate, sorted for a deterministic sum order; where
        stale contributions do not count (stc), only those among `fresh`."""
        stale_too = reuses_stale(self.mode)
        return sorted(
            w for w, e in self._entries.items() if self._counts(e) and (stale_too or w in fresh)
        )

    def norm(self, worker_id: str) -> float:
        """||Q_i|| (0 without a contribution)."""
        entry = self._entries.get(worker_id)
        return 0.0 if entry is None or entry.contribution is None else entry.norm

    def change(self, worker_id: str) -> float | None:
        """How much the worker's last upload moved Q_i, relative to Q_i before it (None: unknown,
        e.g. its first upload)."""
        entry = self._entries.get(worker_id)
        return None if entry is None or entry.contribution is None else entry.change

    def absent(self, worker_id: str) -> int:
        entry = self._entries.get(worker_id)
        return 0 if entry is None else entry.absent

    def _counts(self, entry: _Entry) -> bool:
        if entry.contribution is None:
            return False
        return self.max_absent is None or entry.absent <= self.max_absent

    def weight_used(self, worker_id: str) -> float:
        entry = self._entries.get(worker_id)
        return 0.0 if entry is None else entry.weight_used

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._entries

    # ------------------------------------------------------------ changes

    def check(self, encoded: Sequence[EncodedTensor]) -> None:
        """Raise ValueError unless `encoded` is a well-formed upload for this mode and model."""
        check_upload(
            self.mode,
            self.b_up,
            encoded,
            self.shapes,
            self.bbit_block,
            self.density,
            self.gap_classes,
            self.per_tensor,
        )

    def candidate(self, worker_id: str, encoded: Sequence[EncodedTensor]) -> list[np.ndarray]:
        """What Q_i would become with this upload (nothing changes); ValueError if the upload is
        malformed or the result holds a NaN or infinity (an innovation can overflow Q_i)."""
        self.check(encoded)
        decoded = [decode(e, shape) for e, shape in zip(encoded, self.shapes, strict=True)]
        check_finite(decoded, f"upload from {worker_id}")
        if not is_innovation(self.mode):
            return decoded
        stored = self.contribution(worker_id)
        base = stored if stored is not None else zeros(self.shapes)
        with np.errstate(over="ignore"):  # checked just below
            moved = [q + d for q, d in zip(base, decoded, strict=True)]
        check_finite(moved, f"contribution of {worker_id} after its upload")
        return moved

    def commit(self, worker_id: str, contribution: list[np.ndarray]) -> None:
        """Adopt a candidate as Q_i: the worker moved its Q_hat the same way."""
        entry = self._entries.setdefault(worker_id, _Entry())
        entry.change = _relative_change(entry.contribution, entry.norm, contribution)
        entry.contribution = contribution
        entry.norm = norm(contribution)
        entry.absent = 0
        entry.version += 1

    def apply_upload(self, worker_id: str, encoded: Sequence[EncodedTensor]) -> None:
        """A granted upload arrived: move Q_i exactly as the worker moved Q_hat on commit."""
        self.commit(worker_id, self.candidate(worker_id, encoded))

    def apply_uploads(
        self, uploads: Mapping[str, Sequence[EncodedTensor]], screen: ScreenOptions
    ) -> dict[str, str]:
        """Apply a round's uploads, refusing any that is malformed, not finite or fails the
        screen (flq/algorithm/screening.py). A refused worker is reset: its reference moved on
        its side, and nothing it stored is trusted any more. Returns the refused and why."""
        refused: dict[str, str] = {}
        candidates: dict[str, list[np.ndarray]] = {}
        for worker_id in sorted(uploads):
            try:
                candidates[worker_id] = self.candidate(worker_id, uploads[worker_id])
            except ValueError as error:
                refused[worker_id] = str(error)
        peers = {w: self.norm(w) for w in self.contributors() if w not in uploads}
        norms = {w: norm(c) for w, c in candidates.items()}
        refused.update(screen_norms(norms, peers, screen))
        for worker_id in sorted(uploads):
            if worker_id in refused:
                self.reset(worker_id)
            else:
                self.commit(worker_id, candidates[worker_id])
        return refused

    def note_round(self, present: Collection[str], sitting_out: Collection[str] = ()) -> list[str]:
        """One more round: `present` workers (they offered) are back to 0 rounds absent, those
        `sitting_out` (not invited to it) stay as they were, the others one more. Returns the
        workers whose contribution stopped counting just now."""
        expired = []
        for worker_id, entry in sorted(self._entries.items()):
            if worker_id in sitting_out:
                continue
            was_counting = self._counts(entry)
            entry.absent = 0 if worker_id in present else entry.absent + 1
            if was_counting and not self._counts(entry):
                expired.append(worker_id)
        return expired

    def reset(self, worker_id: str) -> None:
        """Both sides restart the worker's reference from zeros at version 0."""
        entry = self._entries.setdefault(worker_id, _Entry())
        entry.contribution = None
        entry.version = 0

    def remove(self, worker_id: str) -> None:
        """The worker was evicted: forget it entirely (a stranger again if it returns)."""
        self._entries.pop(worker_id, None)

    def record_weights(self, weights: Mapping[str, float]) -> None:
        for worker_id, weight in weights.items():
            self._entries[worker_id].weight_used += weight

    # ------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        ids = sorted(self._entries)
        entries = [self._entries[w] for w in ids]
        return {
            "mode": self.mode,
            "b_up": self.b_up,
            "shapes": [list(s) for s in self.shapes],
            "ids": ids,
            "versions": [e.version for e in entries],
            "weight_used": [e.weight_used for e in entries],
            "absent": [e.absent for e in entries],
            "has_contribution": [e.contribution is not None for e in entries],
            # keyed by position: worker ids may hold characters checkpoint paths cannot
            "contributions": {
                str(i): [a.copy() for a in e.contribution]
                for i, e in enumerate(entries)
                if e.contribution is not None
            },
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        shapes = [tuple(int(d) for d in s) for s in state["shapes"]]
        if shapes != self.shapes or state["mode"] != self.mode:
            raise ValueError(
                f"checkpoint store is for mode {state['mode']} shapes {shapes}, "
                f"this run is mode {self.mode} shapes {self.shapes}"
            )
        self.mode = parse_mode(str(state["mode"]))
        self.b_up = int(state["b_up"])
        # an empty dict does not survive a checkpoint (no leaves), hence the default
        contributions = state.get("contributions", {})
        self._entries = {}
        rows = zip(
            state["ids"],
            state["versions"],
            state["weight_used"],
            state["has_contribution"],
            strict=True,
        )
        absent = list(state.get("absent", [0] * len(state["ids"])))  # older checkpoints: 0
        for index, (worker_id, version, used, has) in enumerate(rows):
            stored = contributions[str(index)] if has else None
            contribution = None if stored is None else [np.array(a, np.float32) for a in stored]
            if contribution is not None:
                check_finite(contribution, f"checkpoint contribution of {worker_id}")
            self._entries[str(worker_id)] = _Entry(
                contribution=contribution,
                version=int(version),
                weight_used=float(used),
                norm=0.0 if contribution is None else norm(contribution),
                absent=int(absent[index]),
            )


def _relative_change(
    before: list[np.ndarray] | None, before_norm: float, after: list[np.ndarray]
) -> float | None:
    if before is None or before_norm <= 0:
        return None
    return norm([a - b for a, b in zip(after, before, strict=True)]) / before_norm

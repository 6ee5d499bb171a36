"""Downlink: one shared reference theta_ref on the master, mirrored by every in-sync worker.

Each round the master moves theta_ref towards theta by a `b_down`-bit LAQ-grid delta, its indices
under bzip2 where that is smaller (flq/codec/lossless.py; or sets it to theta when b_down is 32),
or with `density` p > 0 by a sparse ternary delta: the top p of
theta - theta_ref as +-mu (flq/algorithm/stc.py). What a delta leaves out stays in
theta - theta_ref and is sent in later rounds: the server-side error accumulation of STC
(Sattler et al., arXiv 1903.02891), with no separate residual to keep. Then the version goes up.

The delta is encoded once and sent to every worker holding version-1. A worker further behind
(it missed rounds) gets the chain of the deltas it missed, in order, when the master still has
them and they cost less than a keyframe (STC's update cache for clients that skipped rounds);
anyone else (new, unknown version) gets a float32 keyframe of the NEW theta_ref. Either way,
after the round every worker holds exactly theta_ref at the same version, and trains from it.
Master and worker add the same decoded float32 deltas in the same order, so the two copies stay
bit-identical.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flq.algorithm._arrays import as_float32, check_finite, check_shapes, shapes_of
from flq.algorithm.modes import wire_form
from flq.algorithm.stc import sparsify
from flq.codec import EncodedTensor, decode, encode_float32, encode_laq_grid, header_bits

FLOAT_BITS = 32
CACHED_ROUNDS = 64  # deltas kept for workers that missed rounds (a chain is capped by cost too)


def _cost(encoded: Sequence[EncodedTensor]) -> int:
    return sum(e.cost_bits() for e in encoded)


class DownlinkRound:
    """One round's downlink: the shared delta (if any), catch-up chains for workers that missed
    rounds, and a keyframe, each built on first request and then shared by every worker."""

    def __init__(
        self,
        version: int,
        delta: list[EncodedTensor] | None,
        reference: list[np.ndarray],
        missed: Sequence[list[EncodedTensor]] = (),
    ) -> None:
        self.version = version
        self.delta = delta
        self._reference = reference  # this round's theta_ref; never modified afterwards
        self._keyframe: list[EncodedTensor] | None = None
        # missed[-1] is the delta to version-1, missed[-2] the one to version-2, ...
        self._missed = list(missed)
        self._chains: dict[int, list[EncodedTensor]] = {}

    @property
    def keyframe(self) -> list[EncodedTensor]:
        if self._keyframe is None:
            self._keyframe = [encode_float32(a) for a in self._reference]
        return self._keyframe

    def payload_for(self, worker_version: int) -> tuple[list[EncodedTensor], bool]:
        """(encoded tensors, is_keyframe) for a worker that holds `worker_version`: this round's
        delta, the chain of deltas it missed (their tensors one round after another), or the
        keyframe."""
        if self.delta is None:
            return self.keyframe, True
        if worker_version == self.version - 1:
            return self.delta, False
        chain = self._chain_from(worker_version, self.delta)
        return (chain, False) if chain is not None else (self.keyframe, True)

    def _chain_from(
        self, worker_version: int, delta: list[EncodedTensor]
    ) -> list[EncodedTensor] | None:
        behind = self.version - 1 - worker_version  # deltas missed before this round's
        if not 0 < behind <= len(self._missed) or worker_version < 1:
            return None
        if worker_version not in self._chains:
            chain = [t for missed in self._missed[-behind:] for t in missed] + delta
            keyframe_bits = sum(
                FLOAT_BITS * a.size + header_bits(a.ndim, 0) for a in self._reference
            )
            self._chains[worker_version] = chain if _cost(chain) < keyframe_bits else []
        return self._chains[worker_version] or None


class DownlinkSender:
    def __init__(
        self, b_down: int, density: float = 0.0, gap_classes: bool = True, per_tensor: bool = True
    ) -> None:
        if b_down < 1:
            raise ValueError(f"b_down must be >= 1, got {b_down}")
        if not 0 <= density <= 1:
            raise ValueError(f"down_density must be in [0, 1], got {density}")
        self.b_down = b_down
        self.density = density  # > 0: sparse ternary deltas
        self.gap_classes = gap_classes
        self.per_tensor = per_tensor  # sparse deltas: each tensor its own top p (else the model's)
        self.version = 0
        self.reference: list[np.ndarray] | None = None  # theta_ref: what in-sync workers hold
        self.last_round: DownlinkRound | None = None
        # the deltas to versions version-CACHED_ROUNDS+1 .. version, oldest first
        self._recent: deque[list[EncodedTensor]] = deque(maxlen=CACHED_ROUNDS)

    def prepare(self, theta: Sequence[np.ndarray]) -> DownlinkRound:
        """Advance theta_ref towards `theta` and return what this round sends."""
        check_finite(theta, "global weights")
        if self.reference is not None:
            check_shapes(theta, shapes_of(self.reference), "global weights")
        delta: list[EncodedTensor] | None = None
        if self.reference is None or (self.b_down == FLOAT_BITS and not self.density):
            reference = as_float32(theta)
        else:
            delta, reference = self._delta_towards(theta, self.reference)
        self.reference = reference
        self.version += 1
        self.last_round = DownlinkRound(self.version, delta, reference, tuple(self._recent))
        if delta is None:
            self._recent.clear()  # no chain can cross a round without a delta
        else:
            self._recent.append(delta)
        return self.last_round

    def payload_for(self, worker_version: int) -> tuple[list[EncodedTensor], bool]:
        if self.last_round is None:
            raise ValueError("no downlink prepared yet")
        return self.last_round.payload_for(worker_version)

    def _delta_towards(
        self, theta: Sequence[np.ndarray], reference: list[np.ndarray]
    ) -> tuple[list[EncodedTensor], list[np.ndarray]]:
        # Fresh arrays, not in place: an earlier DownlinkRound may still build its keyframe.
        gap = [np.asarray(t, np.float32) - r for t, r in zip(theta, reference, strict=True)]
        if self.density:
            delta = sparsify(gap, self.density, self.gap_classes, self.per_tensor)
        else:
            delta = [encode_laq_grid(g, self.b_down) for g in gap]
        moved = [r + decode(e, r.shape) for r, e in zip(reference, delta, strict=True)]
        return wire_form(delta), moved

    def state(self) -> dict[str, Any]:
        return {
            "b_down": self.b_down,
            "density": self.density,
            "version": self.version,
            "has_reference": self.reference is not None,
            "reference": [] if self.reference is None else [a.copy() for a in self.reference],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.b_down = int(state["b_down"])
        self.density = float(state.get("density", 0.0))  # older checkpoints: b_down deltas
        self.version = int(state["version"])
        stored = state.get("reference", [])
        has = bool(state["has_reference"])
        self.reference = [np.array(a, np.float32) for a in stored] if has else None
        # The next round builds on the restored reference; nobody holds the last round's payload
        # and no chain of deltas from before the restart is served.
        self.last_round = None
        self._recent.clear()


class DownlinkReceiver:
    """Worker side: rebuilds theta_ref from keyframes and deltas."""

    def __init__(self) -> None:
        self.version = 0
        self._weights: list[np.ndarray] | None = None

    @property
    def weights(self) -> list[np.ndarray]:
        if self._weights is None:
            raise ValueError("no downlink received yet")
        return [a.copy() for a in self._weights]

    def apply(
        self, encoded: Sequence[EncodedTensor], is_keyframe: bool, version: int
    ) -> list[np.ndarray]:
        """Apply one round's payload; returns a copy of the weights now held (theta_ref)."""
        if is_keyframe:
            weights = [decode(e) for e in encoded]
        else:
            weights = self._apply_delta(encoded, version)
        check_finite(weights, "downlink")
        self._weights = weights
        self.version = version
        return self.weights

    def _apply_delta(self, encoded: Sequence[EncodedTensor], version: int) -> list[np.ndarray]:
        """One delta, or the chain of the deltas since the version held, applied in order."""
        if self._weights is None or not 0 <= self.version < version:
            raise ValueError(
                f"downlink delta for version {version} needs an older version, "
                f"this worker holds {self.version if self._weights is not None else 'nothing'}"
            )
        per_round = len(self._weights)
        rounds = version - self.version
        if len(encoded) != rounds * per_round:
            raise ValueError(
                f"downlink delta has {len(encoded)} tensors, expected {rounds} rounds of "
                f"{per_round} (from version {self.version} to {version})"
            )
        weights = self._weights
        for first in range(0, len(encoded), per_round):
            step = encoded[first : first + per_round]
            weights = [w + decode(e, w.shape) for w, e in zip(weights, step, strict=True)]
        return weights

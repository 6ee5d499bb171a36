"""Downlink: one shared reference theta_ref on the master, mirrored by every in-sync worker.

Each round the master moves theta_ref towards theta by a `b_down`-bit LAQ-grid delta (or sets it
to theta when b_down is 32) and bumps the version. The delta is encoded once and sent to every
worker holding version-1; anyone else (new, reconnected, missed a round) gets a float32 keyframe
of the NEW theta_ref. Either way, after the round every worker holds exactly theta_ref at the
same version, and trains from it. Master and worker add the same decoded float32 delta, so the
two copies stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flq.algorithm._arrays import as_float32, check_finite, check_shapes, shapes_of
from flq.codec import EncodedTensor, decode, encode_float32, encode_laq_grid

FLOAT_BITS = 32


class DownlinkRound:
    """One round's downlink: the shared delta (if any) and a keyframe built on first request."""

    def __init__(
        self, version: int, delta: list[EncodedTensor] | None, reference: list[np.ndarray]
    ) -> None:
        self.version = version
        self.delta = delta
        self._reference = reference  # this round's theta_ref; never modified afterwards
        self._keyframe: list[EncodedTensor] | None = None

    @property
    def keyframe(self) -> list[EncodedTensor]:
        if self._keyframe is None:
            self._keyframe = [encode_float32(a) for a in self._reference]
        return self._keyframe

    def payload_for(self, worker_version: int) -> tuple[list[EncodedTensor], bool]:
        """(encoded tensors, is_keyframe) for a worker that holds `worker_version`."""
        if self.delta is not None and worker_version == self.version - 1:
            return self.delta, False
        return self.keyframe, True


class DownlinkSender:
    def __init__(self, b_down: int) -> None:
        if b_down < 1:
            raise ValueError(f"b_down must be >= 1, got {b_down}")
        self.b_down = b_down
        self.version = 0
        self.reference: list[np.ndarray] | None = None  # theta_ref: what in-sync workers hold
        self.last_round: DownlinkRound | None = None

    def prepare(self, theta: Sequence[np.ndarray]) -> DownlinkRound:
        """Advance theta_ref towards `theta` and return what this round sends."""
        check_finite(theta, "global weights")
        if self.reference is not None:
            check_shapes(theta, shapes_of(self.reference), "global weights")
        delta: list[EncodedTensor] | None = None
        if self.b_down == FLOAT_BITS or self.reference is None:
            reference = as_float32(theta)
        else:
            delta, reference = self._delta_towards(theta, self.reference)
        self.reference = reference
        self.version += 1
        self.last_round = DownlinkRound(self.version, delta, reference)
        return self.last_round

    def payload_for(self, worker_version: int) -> tuple[list[EncodedTensor], bool]:
        if self.last_round is None:
            raise ValueError("no downlink prepared yet")
        return self.last_round.payload_for(worker_version)

    def _delta_towards(
        self, theta: Sequence[np.ndarray], reference: list[np.ndarray]
    ) -> tuple[list[EncodedTensor], list[np.ndarray]]:
        # Fresh arrays, not in place: an earlier DownlinkRound may still build its keyframe.
        delta = [
            encode_laq_grid(np.asarray(t, np.float32) - r, self.b_down)
            for t, r in zip(theta, reference, strict=True)
        ]
        moved = [r + decode(e, r.shape) for r, e in zip(reference, delta, strict=True)]
        return delta, moved

    def state(self) -> dict[str, Any]:
        return {
            "b_down": self.b_down,
            "version": self.version,
            "has_reference": self.reference is not None,
            "reference": [] if self.reference is None else [a.copy() for a in self.reference],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.b_down = int(state["b_down"])
        self.version = int(state["version"])
        stored = state.get("reference", [])
        has = bool(state["has_reference"])
        self.reference = [np.array(a, np.float32) for a in stored] if has else None
        # The next round builds on the restored reference; nobody holds the last round's payload.
        self.last_round = None


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
        if self._weights is None or self.version != version - 1:
            raise ValueError(
                f"downlink delta for version {version} needs version {version - 1}, "
                f"this worker holds {self.version if self._weights is not None else 'nothing'}"
            )
        if len(encoded) != len(self._weights):
            raise ValueError(
                f"downlink delta has {len(encoded)} tensors, model has {len(self._weights)}"
            )
        return [w + decode(e, w.shape) for w, e in zip(self._weights, encoded, strict=True)]

"""One round's downlink, prepared once and shared by every worker of the round.

The engine asks `PreparedRound.payload_for(version)` for each worker: a worker that holds the
previous downlink reference gets the b_down delta, one a few rounds behind the chain of deltas it
missed, any other the float32 keyframe of the new reference. Each is split into RoundStart
messages at most once per round, and the links convert (gRPC) or measure (in memory) each
`DownlinkPayload` once (flq.link.PayloadCache, keyed by kind, version and base version).
"""

from __future__ import annotations

from typing import Literal

from flq.algorithm import DownlinkRound
from flq.codec import group_chunks, split_tensors
from flq.link import DownlinkPayload
from flq.types import RoundConfig, RoundStart


class PreparedRound:
    def __init__(
        self, round_id: int, downlink: DownlinkRound, config: RoundConfig, lazy_scalar: float
    ) -> None:
        self.round = round_id
        self.config = config
        self.lazy_scalar = lazy_scalar
        self._downlink = downlink
        self._payloads: dict[int, DownlinkPayload] = {}  # by base version

    @property
    def version(self) -> int:
        """The downlink reference version every worker holds after this round's RoundStart."""
        return self._downlink.version

    def payload_for(self, worker_version: int) -> DownlinkPayload:
        """What a worker holding downlink reference `worker_version` is sent."""
        encoded, is_keyframe = self._downlink.payload_for(worker_version)
        kind: Literal["delta", "keyframe"] = "keyframe" if is_keyframe else "delta"
        # A worker further behind gets its own chain of deltas, shared only with workers that
        # hold the same version (flq/algorithm/downlink.py): a delta is keyed by where it starts.
        base = -1 if is_keyframe else worker_version
        payload = self._payloads.get(base)
        if payload is None:
            groups = group_chunks(split_tensors(encoded))
            messages = tuple(
                RoundStart(
                    round=self.round,
                    config=self.config,
                    lazy_scalar=self.lazy_scalar,
                    download_ref_version=self.version,
                    part=part,
                    parts=len(groups),
                    tensors=tuple(group),
                )
                for part, group in enumerate(groups)
            )
            bits = sum(e.cost_bits() for e in encoded)
            payload = DownlinkPayload(
                round=self.round,
                kind=kind,
                version=self.version,
                base_version=base,
                messages=messages,
                bits=bits,
            )
            self._payloads[base] = payload
        return payload

"""The worker's upload reference: what it last got acknowledged, and the lazy rule's inputs.

`prepare` quantizes one update and evaluates the lazy rule without touching any state; only
`commit` (the master granted and the payload went out) advances the reference, and `skip`
(lazy or denied) just ticks the clock. The master mirrors the same arithmetic in
`ContributionStore`, so its stored Q_i stays bit-identical to this worker's Q_hat.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from flq.algorithm._arrays import (
    Shapes,
    as_float32,
    check_finite,
    check_shapes,
    sq_norm,
    zeros,
)
from flq.algorithm.lazy import LazyParams, decide, lazy_threshold
from flq.algorithm.modes import (
    Mode,
    is_innovation,
    parse_mode,
    quantize_update,
    reuses_stale,
    wire_form,
)
from flq.codec import EncodedTensor, decode


class RoundConfigLike(Protocol):
    """The fields of flq.types.RoundConfig the reference needs (kept structural so this
    package does not depend on the message types)."""

    @property
    def mode(self) -> str: ...
    @property
    def b_up(self) -> int: ...
    @property
    def thr_scale(self) -> float: ...
    @property
    def lazy_d(self) -> int: ...
    @property
    def lazy_ck(self) -> float: ...
    @property
    def lazy_c(self) -> int: ...
    @property
    def warmup(self) -> int: ...
    @property
    def stochastic_rounding(self) -> bool: ...
    @property
    def bbit_block(self) -> int: ...
    @property
    def error_feedback(self) -> bool: ...
    @property
    def density(self) -> float: ...
    @property
    def gap_code(self) -> str: ...
    @property
    def sparse_scope(self) -> str: ...


@dataclass(frozen=True)
class UploadSettings:
    """Everything that shapes a worker's uploads; equal settings mean a reference can be kept."""

    mode: Mode
    b_up: int = 4
    lazy: LazyParams = field(default_factory=LazyParams)
    error_feedback: bool = True  # laq8, stc: innovation modes carry the error in Q_hat already
    stochastic_rounding: bool = False  # bbit only
    bbit_block: int = 0  # bbit only: 0 = LAQ grid, N = block grid with N values per radius
    density: float = 0.01  # stc only: fraction of the update's values each upload keeps
    gap_classes: bool = True  # stc, sti: gap classes where smaller than Golomb-Rice
    per_tensor: bool = True  # stc, sti: each tensor its own top p and mu (False: over the model)

    @property
    def uses_residual(self) -> bool:
        return self.mode in ("laq8", "stc") and self.error_feedback


@dataclass(frozen=True)
class PreparedUpload:
    """One round's quantized update and lazy decision, not yet applied to the reference."""

    encoded: list[EncodedTensor]
    delta: list[np.ndarray]  # dQ: what the master's stored contribution moves by
    candidate: list[np.ndarray]  # Q_hat after commit
    residual: list[np.ndarray] | None  # error-feedback residual after commit (laq8, stc)
    energy: float  # ||dQ||^2
    err_sq: float  # ||eps_k||^2: quantization error of this upload
    threshold: float
    cost_bits: int  # exact wire cost of `encoded`
    wants_upload: bool
    forced: bool
    clock: int
    version_after: int


class UploadReference:
    """Per-worker state: Q_hat, ||eps_hat||^2, clock, version, recent h, laq8 residual."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], settings: UploadSettings) -> None:
        self.shapes: Shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self.settings = settings
        self.q_hat: list[np.ndarray] = zeros(self.shapes)
        self.residual: list[np.ndarray] = zeros(self.shapes) if settings.uses_residual else []
        self.err_sq = 0.0
        self.clock = 0
        self.version = 0
        self.history: deque[float] = deque(maxlen=settings.lazy.history)

    @staticmethod
    def key_for(config: RoundConfigLike) -> UploadSettings:
        return UploadSettings(
            mode=parse_mode(config.mode),
            b_up=int(config.b_up),
            lazy=LazyParams(
                thr_scale=float(config.thr_scale),
                history=int(config.lazy_d),
                ck=float(config.lazy_ck),
                max_clock=int(config.lazy_c),
                warmup=int(config.warmup),
            ),
            error_feedback=bool(config.error_feedback),
            stochastic_rounding=bool(config.stochastic_rounding),
            bbit_block=int(config.bbit_block),
            density=float(config.density),
            gap_classes=config.gap_code != "golomb",
            per_tensor=config.sparse_scope != "model",
        )

    @classmethod
    def from_round_config(
        cls, shapes: Sequence[tuple[int, ...]], config: RoundConfigLike
    ) -> UploadReference:
        return cls(shapes, cls.key_for(config))

    @property
    def config_key(self) -> UploadSettings:
        return self.settings

    def observe_scalar(self, h: float) -> None:
        """Record the lazy scalar the master broadcast with this round (the last D are kept)."""
        if not np.isfinite(h) or h < 0:
            raise ValueError(f"lazy scalar must be finite and >= 0, got {h}")
        self.history.append(float(h))

    def prepare(
        self, update: Sequence[np.ndarray], round_index: int, rng: np.random.Generator
    ) -> PreparedUpload:
        """Quantize `update` and decide whether to offer it; the reference is left unchanged."""
        check_shapes(update, self.shapes, "update")
        check_finite(update, "update")
        if is_innovation(self.settings.mode):
            quantized = self._quantize_innovation(update, rng)
        else:
            quantized = self._quantize_raw(update, rng)
        encoded, delta, candidate, error, residual = quantized
        energy, err_sq = sq_norm(delta), sq_norm(error)
        params = self.settings.lazy
        threshold = lazy_threshold(params, self.history, err_sq, self.err_sq)
        decision = decide(
            params,
            energy,
            threshold,
            self.clock,
            round_index,
            lazy_enabled=self.settings.mode != "fedavg",
        )
        return PreparedUpload(
            encoded=encoded,
            delta=delta,
            candidate=candidate,
            residual=residual,
            energy=energy,
            err_sq=err_sq,
            threshold=threshold,
            cost_bits=sum(e.cost_bits() for e in encoded),
            wants_upload=decision.wants_upload,
            forced=decision.forced,
            clock=self.clock,
            version_after=self.version + 1,
        )

    def commit(self, prepared: PreparedUpload) -> None:
        """The upload was granted and sent: the reference becomes what the master now stores."""
        if prepared.version_after != self.version + 1:
            raise ValueError(
                f"prepared for version {prepared.version_after - 1}, reference is at "
                f"{self.version}: prepare again"
            )
        self.q_hat = [a.copy() for a in prepared.candidate]
        if prepared.residual is not None:
            self.residual = [a.copy() for a in prepared.residual]
        self.err_sq = prepared.err_sq
        self.clock = 0
        self.version += 1

    def skip(self) -> None:
        """Lazy or denied: nothing was sent, only the staleness clock moves."""
        self.clock += 1

    # ------------------------------------------------------------ quantizers

    def _encode(
        self, values: Sequence[np.ndarray], rng: np.random.Generator
    ) -> list[EncodedTensor]:
        return _encode_with(self.settings, values, rng)

    def _quantize_innovation(
        self, update: Sequence[np.ndarray], rng: np.random.Generator
    ) -> _Quantized:
        """bbit/bin: quantize v = u - Q_hat; candidate Q = Q_hat + dQ; eps = v - dQ."""
        innovation = [
            np.asarray(u, np.float32) - q for u, q in zip(update, self.q_hat, strict=True)
        ]
        encoded = self._encode(innovation, rng)
        delta = [decode(e, shape) for e, shape in zip(encoded, self.shapes, strict=True)]
        candidate = [q + d for q, d in zip(self.q_hat, delta, strict=True)]
        error = [v - d for v, d in zip(innovation, delta, strict=True)]
        return wire_form(encoded), delta, candidate, error, None

    def _quantize_raw(self, update: Sequence[np.ndarray], rng: np.random.Generator) -> _Quantized:
        """fedavg/laq8/stc: quantize x = u (+ residual); eps = x - Qnew is the next residual.
        dQ = Qnew - Q_hat where the master reuses stale contributions (it moves Q_i by dQ);
        stc's contribution counts in its own round only, so there dQ = Qnew."""
        values = as_float32(update)
        if self.settings.uses_residual:
            values = [x + r for x, r in zip(values, self.residual, strict=True)]
        encoded = self._encode(values, rng)
        quantized = [decode(e, shape) for e, shape in zip(encoded, self.shapes, strict=True)]
        if reuses_stale(self.settings.mode):
            delta = [n - q for n, q in zip(quantized, self.q_hat, strict=True)]
        else:
            delta = quantized
        error = [x - n for x, n in zip(values, quantized, strict=True)]
        residual = error if self.settings.uses_residual else None
        return wire_form(encoded), delta, quantized, error, residual


_Quantized = tuple[
    list[EncodedTensor],
    list[np.ndarray],
    list[np.ndarray],
    list[np.ndarray],
    list[np.ndarray] | None,
]


def _encode_with(
    s: UploadSettings, values: Sequence[np.ndarray], rng: np.random.Generator
) -> list[EncodedTensor]:
    """The packed tensors `s` quantizes `values` to (decode these; `wire_form` is what is sent)."""
    return quantize_update(
        s.mode,
        values,
        s.b_up,
        rng,
        s.stochastic_rounding,
        s.bbit_block,
        s.density,
        gap_classes=s.gap_classes,
        per_tensor=s.per_tensor,
    )


def upload_cost_bits(shapes: Sequence[tuple[int, ...]], config: RoundConfigLike) -> int:
    """The wire cost of one upload of tensors of these shapes under `config`'s upload settings,
    by encoding a seeded normal sample: exact for the fixed-size codecs; for stc/sti, whose
    position codes depend on the values, and bbit's grids under bzip2, the cost of that sample."""
    rng = np.random.default_rng(0)
    sample = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    encoded = wire_form(_encode_with(UploadReference.key_for(config), sample, rng))
    return sum(e.cost_bits() for e in encoded)

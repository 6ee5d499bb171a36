"""The math of one FLQ round, numpy only and free of I/O.

modes (what goes on the wire) -> reference (worker: quantize, lazy rule, commit/skip) ->
selection (master: who may upload) -> store + aggregation (master: stale reuse, weighted mean) ->
robust (how contributions combine) -> screening (which uploads to refuse) ->
server_opt (the global step) -> downlink (shared reference the workers rebuild).
"""

from flq.algorithm.aggregation import (
    AggregateOptions,
    AggregateResult,
    aggregate,
    weighted_mean,
)
from flq.algorithm.downlink import DownlinkReceiver, DownlinkRound, DownlinkSender
from flq.algorithm.lazy import LazyDecision, LazyParams, decide, is_forced, lazy_threshold
from flq.algorithm.modes import (
    MODES,
    Mode,
    bits_per_value,
    check_upload,
    encode_upload,
    is_innovation,
    parse_mode,
    upload_codec,
)
from flq.algorithm.reference import (
    PreparedUpload,
    RoundConfigLike,
    UploadReference,
    UploadSettings,
)
from flq.algorithm.robust import RULES, RuleName, combine, parse_rule
from flq.algorithm.screening import ScreenOptions, screen_norms
from flq.algorithm.selection import Offer, Selection, select_uploads
from flq.algorithm.server_opt import (
    OPTIMIZERS,
    AdaptiveOptimizer,
    AverageOptimizer,
    OptimizerName,
    Proposal,
    ServerOptimizer,
    SgdOptimizer,
    make_server_optimizer,
)
from flq.algorithm.store import ContributionStore
from flq.algorithm.update_stats import UpdateStats, agreement_weights, update_stats
from flq.algorithm.weighting import (
    SampleWeighting,
    UniformWeighting,
    Weighting,
    make_weighting,
    normalise,
)

__all__ = [
    "MODES",
    "OPTIMIZERS",
    "RULES",
    "AdaptiveOptimizer",
    "AggregateOptions",
    "AggregateResult",
    "AverageOptimizer",
    "ContributionStore",
    "DownlinkReceiver",
    "DownlinkRound",
    "DownlinkSender",
    "LazyDecision",
    "LazyParams",
    "Mode",
    "Offer",
    "OptimizerName",
    "PreparedUpload",
    "Proposal",
    "RoundConfigLike",
    "RuleName",
    "SampleWeighting",
    "ScreenOptions",
    "Selection",
    "ServerOptimizer",
    "SgdOptimizer",
    "UniformWeighting",
    "UpdateStats",
    "UploadReference",
    "UploadSettings",
    "Weighting",
    "aggregate",
    "agreement_weights",
    "bits_per_value",
    "check_upload",
    "combine",
    "decide",
    "encode_upload",
    "is_forced",
    "is_innovation",
    "lazy_threshold",
    "make_server_optimizer",
    "make_weighting",
    "normalise",
    "parse_mode",
    "parse_rule",
    "screen_norms",
    "select_uploads",
    "update_stats",
    "upload_codec",
    "weighted_mean",
]

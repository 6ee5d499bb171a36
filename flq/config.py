"""Typed FLQ config: sections, defaults, validation, file loading.

The file layout is the original FLQ system's, unchanged: JSON or TOML with the sections `system`,
`dataset`, `model`, `flq_algorithm`, `lazy_selection`, `budget_selection`, `jetson_optimization`
and `logging`. Old files load as they are; new keys have defaults.

The table is the dataclasses below: every key is one `field(default=..., metadata=rule(help, ...))`,
its annotation gives its type (a `Literal` gives its choices), and that one declaration drives
validation, `config_to_dict`/`dumps_toml` and the generated reference in docs/config.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from flq.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10; tomli is tomllib's backport (a 3.10-only dependency)
    import tomli as tomllib

DatasetName = Literal["digits", "fashion-mnist", "mnist", "npz", "synthetic"]
Partition = Literal["iid", "dirichlet", "shards"]
ModelName = Literal["logreg", "mlp", "cnn"]
ClientOptimizer = Literal["sgd", "adam"]
Mode = Literal["fedavg", "laq8", "bbit", "bin", "stc", "sti"]
GapCode = Literal["best", "golomb"]
SparseScope = Literal["tensor", "model"]
ServerOptimizer = Literal["avg", "sgd", "momentum", "adam", "yogi", "adagrad"]
Weighting = Literal["samples", "uniform", "llm", "agreement"]
AggregationRule = Literal["mean", "trimmed_mean", "median", "norm_clipped"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
LlmProvider = Literal["gemini"]
FusionMethod = Literal["none", "distill", "param_attention"]

URL_SCHEMES = ("http", "grpc")  # the scheme is decoration: the transport is always gRPC
_RULE_KEY = "flq"  # where a field's Rule lives in its dataclass metadata


class ConfigError(UsageError, ValueError):
    """A config file, dict or override is wrong; the message names the source, key and fix."""


@dataclass(frozen=True)
class Rule:
    """How one key is documented and checked, beyond its type."""

    help: str
    original: bool = False  # the key exists in the original FLQ layout
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive minimum
    below: float | None = None  # exclusive maximum
    also: tuple[int, ...] = ()  # special values allowed outside the range (-1 = AUTOTUNE)
    check: Callable[[Any], str | None] | None = None  # says what is wrong, or None
    allowed: str = ""  # how `check` reads in messages and docs


def rule(
    help: str,
    *,
    original: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    also: tuple[int, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    allowed: str = "",
) -> dict[str, Rule]:
    """A key's Rule as dataclass field metadata: `field(default=..., metadata=rule(...))`."""
    return {_RULE_KEY: Rule(help, original, minimum, maximum, above, below, also, check, allowed)}


# ---------------------------------------------------------------- endpoint parsing


def _endpoint_problem(url: str) -> str | None:
    """What is wrong with the host and port of an already split-able URL, or None."""
    if any(char.isspace() for char in url):
        return "must not contain spaces"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return "the port must be a number in 0..65535"
    if parts.username is not None:
        return "expected host:port, without user info"
    if not parts.hostname:
        return "missing host"
    if port is None:
        return "missing port (e.g. :50051)"
    return None


def _master_url_problem(value: Any) -> str | None:
    if "://" not in value:
        return 'expected a URL like http://host:port (or set master_address = "host:port")'
    parts = urlsplit(value)
    if parts.scheme not in URL_SCHEMES:
        return f"the scheme must be one of {', '.join(URL_SCHEMES)}, got {parts.scheme!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "expected only scheme://host:port, without a path or query"
    return _endpoint_problem(value)


def _master_address_problem(value: Any) -> str | None:
    if "/" in value:
        return "expected host:port, without a scheme or path"
    return _endpoint_problem("//" + value)


def _non_empty(value: Any) -> str | None:
    return None if value else "must not be empty"


def _plugin_problem(value: Any) -> str | None:
    """A `module:function` or `path/to/file.py:function` spec, or empty (flq.learning.plugins)."""
    if not value:
        return None
    target, colon, function = value.strip().rpartition(":")
    if not (colon and target and function):
        return "expected 'module:function' or 'path/to/file.py:function'"
    return None


WEIGHTS_SUFFIXES = (".keras", ".weights.h5", ".npz")


def _weights_file_problem(value: Any) -> str | None:
    if not value or value.lower().endswith(WEIGHTS_SUFFIXES):
        return None
    return f"expected a file ending in {', '.join(WEIGHTS_SUFFIXES)}"


# ---------------------------------------------------------------- the sections (the table)


@dataclass(frozen=True)
class SystemConfig:
    """The federation: size, rounds, where the master listens, deadlines."""

    total_workers: int = field(
        default=4,
        metadata=rule(
            "Workers in the federation (one data partition each).", original=True, minimum=1
        ),
    )
    min_workers: int = field(
        default=2,
        metadata=rule(
            "Workers that must be connected before a round starts.", original=True, minimum=1
        ),
    )
    max_rounds: int = field(default=30, metadata=rule("Rounds to run.", original=True, minimum=1))
    master_url: str = field(
        default="http://127.0.0.1:50051",
        metadata=rule(
            "Where the master listens and workers connect. The scheme is ignored (the transport is "
            "gRPC); port 0 lets the master pick a free port.",
            original=True,
            check=_master_url_problem,
            allowed="http://host:port or grpc://host:port",
        ),
    )
    round_timeout_s: float = field(
        default=60.0,
        metadata=rule("Per-round deadline (s); a worker that misses it fails that round.", above=0),
    )
    offer_quorum: float = field(
        default=0.5,
        metadata=rule(
            "Share of the round's workers whose offers make a quorum: once it is in and the "
            "grace has passed, selection goes ahead without the rest (their later offers are "
            "denied 'late'); 1 = wait for every offer (at most 80 % of round_timeout_s). "
            "flq simulate always waits for every offer: its in-memory workers are never silent.",
            above=0,
            maximum=1,
        ),
    )
    participation: float = field(
        default=1.0,
        metadata=rule(
            "Share of the connected workers invited to each round, drawn at random (seeded by "
            "system.seed and the round); the rest sit the round out: they train nothing, their "
            "stored contribution still counts where the mode reuses it (bbit, bin, sti), and "
            "sitting out is not absence. 1 = every worker, every round.",
            above=0,
            maximum=1,
        ),
    )
    offer_grace_s: float = field(
        default=2.0,
        metadata=rule(
            "After the quorum, wait at least this long (s) for the other offers, or as long "
            "again as the quorum took if that is longer.",
            minimum=0,
        ),
    )
    connect_timeout_s: float = field(
        default=0.0,
        metadata=rule(
            "How long (s) the master waits for min_workers to be connected before a round, "
            "then gives up (exit 6, naming the workers it saw); 0 = wait as long as it takes.",
            minimum=0,
        ),
    )
    seed: int = field(
        default=0, metadata=rule("Seed for partitioning, initialisation and sampling.", minimum=0)
    )
    eval_every: int = field(
        default=1, metadata=rule("Evaluate the global model every N rounds.", minimum=1)
    )
    checkpoint_every: int = field(
        default=1,
        metadata=rule(
            "Write the master's checkpoint every N rounds (and at shutdown); a restart with "
            "--resume redoes the rounds since the last one.",
            minimum=1,
        ),
    )
    target_accuracy: float = field(
        default=0.0,
        metadata=rule("Stop once test accuracy reaches this; 0 = off.", minimum=0, maximum=1),
    )

    @property
    def master_host(self) -> str:
        """Host part of master_url (IPv6 without brackets)."""
        return urlsplit(self.master_url).hostname or ""

    @property
    def master_port(self) -> int:
        """Port part of master_url."""
        return urlsplit(self.master_url).port or 0

    @property
    def master_target(self) -> str:
        """`host:port` as gRPC dials and binds it (IPv6 hosts in brackets)."""
        return urlsplit(self.master_url).netloc


@dataclass(frozen=True)
class DatasetConfig:
    """Which data, and how it is split across workers."""

    name: DatasetName = field(
        default="digits",
        metadata=rule(
            "digits (scikit-learn's bundled 8x8 digits), fashion-mnist and mnist (IDX or npz "
            "files), npz (your own arrays), synthetic (a numpy linear-regression problem with "
            "no TensorFlow at all: for tests, scale runs and trying the protocol). Unused when "
            "loader is set.",
            original=True,
        ),
    )
    loader: str = field(
        default="",
        metadata=rule(
            "Your own data: 'module:function' or 'path/to/file.py:function' returning "
            "((x_train, y_train), (x_test, y_test)) numpy arrays. Taking worker_index, it is "
            "called load(worker_index=i, num_workers=n) for worker i's own share (the master "
            "passes None for the test part); without it, it returns the full set and partition "
            "splits it. Empty = the built-in set `name`.",
            check=_plugin_problem,
            allowed="empty or module:function",
        ),
    )
    num_classes: int = field(
        default=0,
        metadata=rule(
            "Classes of the labels; 0 = one more than the largest label the node sees (set it "
            "when a worker's own share may lack the highest class).",
            minimum=0,
        ),
    )
    batch_size: int = field(
        default=32, metadata=rule("Client minibatch size.", original=True, minimum=1)
    )
    partition: Partition = field(
        default="iid",
        metadata=rule(
            "How training data is split: iid; dirichlet (label skew set by dir_alpha); shards "
            "(shards_per_worker label-sorted shards each).",
            original=True,
        ),
    )
    dir_alpha: float = field(
        default=0.5,
        metadata=rule("Dirichlet concentration; smaller means more skew.", original=True, above=0),
    )
    data_dir: str = field(
        default="",
        metadata=rule("Directory of the dataset files; empty = the dataset's default location."),
    )
    shards_per_worker: int = field(
        default=2, metadata=rule("Shards per worker when partition = shards.", minimum=1)
    )
    test_fraction: float = field(
        default=0.25,
        metadata=rule("Fraction held out for testing (digits only).", above=0, below=1),
    )
    synthetic_train_s: float = field(
        default=0.0,
        metadata=rule(
            "synthetic only: seconds each local training call takes, to emulate slow boards.",
            minimum=0,
        ),
    )

    @property
    def label(self) -> str:
        """What logs and results call the data: the loader, else the built-in set."""
        return self.loader or self.name


@dataclass(frozen=True)
class ModelConfig:
    """The model and how each worker trains it locally."""

    name: ModelName = field(
        default="mlp", metadata=rule("Built-in model architecture; unused when builder is set.")
    )
    builder: str = field(
        default="",
        metadata=rule(
            "Your own model: 'module:function' or 'path/to/file.py:function', called as "
            "build() and returning an uncompiled keras.Model that outputs class probabilities "
            "(FLQ adds the optimizer and loss). Every node needs it; workers whose model "
            "differs from the master's are refused at their Hello. Empty = the built-in `name`.",
            check=_plugin_problem,
            allowed="empty or module:function",
        ),
    )
    weights: str = field(
        default="",
        metadata=rule(
            "Initial weights the master starts the global model from (.keras, .weights.h5, or "
            ".npz of the weights in order, as `flq model pull` writes); workers get them with "
            "the first round. Empty = the model's own initialisation (seeded).",
            check=_weights_file_problem,
            allowed="empty or a .keras / .weights.h5 / .npz file",
        ),
    )
    lr: float = field(default=0.05, metadata=rule("Client learning rate.", original=True, above=0))
    lr_decay_every: int = field(
        default=0,
        metadata=rule(
            "Step decay of the client learning rate: every this many rounds the master tells "
            "workers lr x lr_decay_factor (round r trains with lr x factor^((r-1) // every)); "
            "0 = constant. Constant-rate SGD levels off at its noise floor; a step down late "
            "lowers it.",
            minimum=0,
        ),
    )
    lr_decay_factor: float = field(
        default=0.5,
        metadata=rule("What each step of lr_decay_every multiplies lr by.", above=0, maximum=1),
    )
    l2: float = field(
        default=0.0,
        metadata=rule("L2 penalty coefficient in the client loss.", original=True, minimum=0),
    )
    local_epochs: int = field(
        default=1,
        metadata=rule(
            "Local epochs per round, used when local_steps = 0.", original=True, minimum=1
        ),
    )
    local_steps: int = field(
        default=1,
        metadata=rule(
            "Local minibatch steps per round; 1 = one minibatch gradient (the LAQ/FLQ setting); "
            "0 = run local_epochs instead.",
            minimum=0,
        ),
    )
    optimizer: ClientOptimizer = field(default="sgd", metadata=rule("Client optimizer."))
    prox_mu: float = field(
        default=0.0, metadata=rule("FedProx proximal weight; 0 = off.", minimum=0)
    )
    hidden_units: int = field(
        default=64, metadata=rule("Hidden layer width of the mlp model.", minimum=1)
    )

    @property
    def label(self) -> str:
        """What logs and results call the model: the builder, else the built-in name."""
        return self.builder or self.name


@dataclass(frozen=True)
class AlgorithmConfig:
    """Quantization of the uplink and downlink, and the server step."""

    mode: Mode = field(
        default="bbit",
        metadata=rule(
            "Uplink scheme: fedavg (float32), laq8 (8-bit stochastic), bbit (b_up-bit innovation), "
            "bin (1-bit sign innovation), stc (sparse ternary: the top `density` of the update "
            "plus residual as +-mu, Golomb-coded positions; Sattler et al. 2019), sti (the same "
            "code on the innovation u - Q_hat, with FLQ's stale reuse).",
            original=True,
        ),
    )
    b_up: int = field(
        default=4,
        metadata=rule(
            "Uplink bits per coordinate in bbit mode.", original=True, minimum=1, maximum=16
        ),
    )
    b_down: int = field(
        default=32,
        metadata=rule(
            "Downlink bits per coordinate; 32 = float32.",
            original=True,
            minimum=1,
            maximum=16,
            also=(32,),
        ),
    )
    clip_global: float = field(
        default=0.0,
        metadata=rule(
            "Clip the aggregated step to this global L2 norm; 0 = off.", original=True, minimum=0
        ),
    )
    scale_by_selected: bool = field(
        default=False,
        metadata=rule(
            "Multiply the aggregated step by (selected workers / sel_ref).", original=True
        ),
    )
    sel_ref: float = field(
        default=1.0,
        metadata=rule("Reference worker count for scale_by_selected.", original=True, above=0),
    )
    stochastic_rounding: bool = field(
        default=False,
        metadata=rule("Round stochastically (unbiased) on the bbit grid instead of to nearest."),
    )
    bbit_block: int = field(
        default=0,
        metadata=rule(
            "bbit grid: 0 = the LAQ grid, one radius per tensor; N > 0 = the block grid, a "
            "symmetric grid with 0 on it and one float32 radius per N values (needs b_up >= 2; "
            "256 cuts the error on CNN updates several-fold, docs/benchmarks.md).",
            minimum=0,
            maximum=1 << 24,
        ),
    )
    error_feedback: bool = field(
        default=True,
        metadata=rule(
            "Add each worker's quantization residual to its next update (raw modes only: laq8, "
            "stc; bbit and bin carry it in their reference)."
        ),
    )
    density: float = field(
        default=0.01,
        metadata=rule(
            "stc, sti: fraction p of the values each upload keeps (top-k, sent as +-mu; "
            "over each tensor or the whole model: sparse_scope).",
            above=0,
            maximum=1,
        ),
    )
    gap_code: GapCode = field(
        default="best",
        metadata=rule(
            "stc, sti: how kept positions are coded: golomb (Golomb-Rice, the STC paper's) or "
            "best (per tensor the smaller of Golomb-Rice and Huffman-coded gap classes)."
        ),
    )
    sparse_scope: SparseScope = field(
        default="tensor",
        metadata=rule(
            "stc, sti (both ways): tensor = every tensor keeps its own top ceil(p*n) values as "
            "+-mu with its own mu (the STC reference code's way: no layer starves); model = "
            "the top p over all tensors together, one mu."
        ),
    )
    down_density: float = field(
        default=0.0,
        metadata=rule(
            "Downlink: 0 = b_down-bit deltas; p > 0 = sparse ternary deltas keeping the top p of "
            "(global model - what workers hold), the rest carried to the next round.",
            minimum=0,
            maximum=1,
        ),
    )
    server_optimizer: ServerOptimizer = field(
        default="avg",
        metadata=rule(
            "Server step: avg applies the mean update, sgd scales it by server_lr, momentum is "
            "heavy-ball SGD on it (FedAvgM, beta 0.9); adam, yogi, adagrad are adaptive (FedOpt)."
        ),
    )
    server_lr: float = field(default=1.0, metadata=rule("Server learning rate.", above=0))
    weighting: Weighting = field(
        default="samples",
        metadata=rule(
            "Aggregation weights: by sample count, uniform, proposed by an LLM ([llm]), or "
            "agreement: sample counts, down-weighted for updates that agree less with the "
            "others than the median does (the same statistics the LLM is shown, no model)."
        ),
    )


_rule = rule  # AggregationConfig has a key named `rule`, which hides the function in its body


@dataclass(frozen=True)
class AggregationConfig:
    """How stored contributions combine, which uploads are refused, how long stale ones count."""

    rule: AggregationRule = field(
        default="mean",
        metadata=rule(
            "mean (FedAvg; honest fleets), trimmed_mean (per coordinate, drop `trim` of the "
            "weight at each end), median (per coordinate; survives up to half bad weight, "
            "noisiest on non-IID data), norm_clipped (each contribution scaled to at most "
            "clip_factor x the median norm). See docs/architecture.md."
        ),
    )
    trim: float = field(
        default=0.1,
        metadata=_rule(
            "trimmed_mean: share of the weight dropped at each end, per coordinate.",
            minimum=0,
            below=0.5,
        ),
    )
    clip_factor: float = field(
        default=2.0,
        metadata=_rule(
            "norm_clipped: contributions are scaled to at most this x the median norm.", above=0
        ),
    )
    screen_factor: float = field(
        default=10.0,
        metadata=_rule(
            "Refuse (and reset) an upload whose contribution norm exceeds this x the median "
            "norm of the others (needs 2 others); 0 = no screening.",
            minimum=0,
        ),
    )
    max_absent_rounds: int = field(
        default=5,
        metadata=_rule(
            "A worker's stored contribution stops counting after it has sent no offer for this "
            "many rounds in a row (gone or silent); it counts again once the worker is back.",
            minimum=0,
        ),
    )


@dataclass(frozen=True)
class LazyConfig:
    """Lazy uploads (LAQ): a worker skips a round when its innovation is small."""

    D: int = field(
        default=10,
        metadata=rule("Rounds of model movement in the lazy threshold.", original=True, minimum=1),
    )
    ck: float = field(
        default=0.8,
        metadata=rule("Weight of the movement history (ck/D per round).", original=True, minimum=0),
    )
    C: int = field(
        default=50,
        metadata=rule(
            "A worker silent for C rounds is forced to upload.", original=True, minimum=1
        ),
    )
    warmup: int = field(
        default=5,
        metadata=rule("First rounds in which every worker uploads.", original=True, minimum=0),
    )
    thr_scale: float = field(
        default=0.0,
        metadata=rule(
            "Scale of the lazy threshold; 0 = lazy skipping off.", original=True, minimum=0
        ),
    )


@dataclass(frozen=True)
class BudgetConfig:
    """Which offered uploads the master grants each round (by energy per bit)."""

    sel_clients: int = field(
        default=0,
        metadata=rule(
            "Grant at most this many uploads per round; 0 = no limit.", original=True, minimum=0
        ),
    )
    up_budget_bits: float = field(
        default=0.0,
        metadata=rule("Uplink bits granted per round; 0 = no budget.", original=True, minimum=0),
    )
    by_sample_share: bool = field(
        default=False,
        metadata=rule(
            "Rank offers by innovation energy times the worker's squared sample share (the error "
            "its stale contribution leaves in the weighted aggregate) instead of raw energy."
        ),
    )


@dataclass(frozen=True)
class JetsonConfig:
    """TensorFlow runtime settings for the worker's device."""

    gpu_memory_limit_mb: int = field(
        default=0,
        metadata=rule("Cap TensorFlow's GPU memory (MiB); 0 = no cap.", original=True, minimum=0),
    )
    memory_growth: bool = field(
        default=True, metadata=rule("Grow GPU memory as needed instead of taking it all.")
    )
    enable_mixed_precision: bool = field(
        default=False, metadata=rule("Train in mixed float16 precision.", original=True)
    )
    prefetch_size: int = field(
        default=2,
        metadata=rule(
            "tf.data prefetch buffer (batches); -1 = AUTOTUNE.",
            original=True,
            minimum=0,
            also=(-1,),
        ),
    )
    num_parallel_calls: int = field(
        default=2,
        metadata=rule(
            "tf.data parallel map calls; -1 = AUTOTUNE.", original=True, minimum=1, also=(-1,)
        ),
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Logs, results and checkpoints."""

    log_level: LogLevel = field(
        default="info", metadata=rule("Lowest level logged.", original=True)
    )
    log_format: LogFormat = field(
        default="auto",
        metadata=rule("auto = JSON when not on a terminal (journald), console on a terminal."),
    )
    save_results: bool = field(
        default=True, metadata=rule("Write one results row per round.", original=True)
    )
    result_dir: str = field(
        default="results",
        metadata=rule(
            "Directory for results.", original=True, check=_non_empty, allowed="non-empty"
        ),
    )
    checkpoint_dir: str = field(
        default="checkpoints",
        metadata=rule("Directory for master checkpoints.", check=_non_empty, allowed="non-empty"),
    )


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, worker tokens, admin token: file paths and a variable name, never the secrets."""

    tls_cert: str = field(
        default="",
        metadata=rule("Server certificate (PEM) for TLS on the gRPC port; empty = no TLS."),
    )
    tls_key: str = field(
        default="", metadata=rule("Private key (PEM) of tls_cert; file mode 0600.")
    )
    tls_ca: str = field(
        default="",
        metadata=rule(
            "CA certificate (PEM) that worker and admin client certificates must chain to."
        ),
    )
    require_client_cert: bool = field(
        default=False,
        metadata=rule(
            "Mutual TLS: refuse clients without a certificate signed by tls_ca; a worker's "
            "certificate common name must then equal its worker id."
        ),
    )
    tokens_file: str = field(
        default="",
        metadata=rule(
            "File of `worker_id token` lines (token plain or `sha256:<hex>`); workers must send "
            "theirs; empty = no worker tokens."
        ),
    )
    admin_token_env: str = field(
        default="FLQ_ADMIN_TOKEN",
        metadata=rule(
            "Environment variable holding the admin token (plain or `sha256:<hex>`) that Status, "
            "Stop and GetGlobalModel require; unset or empty variable = admin RPCs open."
        ),
    )


def _env_name_problem(value: Any) -> str | None:
    if not value or not (value[0].isalpha() or value[0] == "_"):
        return "expected an environment variable name such as GEMINI_API_KEY"
    if not all(char.isalnum() or char == "_" for char in value):
        return "expected letters, digits and underscores only"
    return None


def _http_url_problem(value: Any) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected empty or an http(s)://host[:port][/path] URL"
    return _endpoint_problem(value) if parts.port is not None else None


FEATURE_TEXT_CHARS = 200  # one description in the prompt: a sentence, not an essay


def _feature_meanings_problem(value: Any) -> str | None:
    for name, text in value.items():
        if not name or len(name) > 64 or not name.isprintable():
            return f"feature name {name!r}: expected 1..64 printable characters"
        if not text.strip() or len(text) > FEATURE_TEXT_CHARS:
            return f"feature {name!r}: expected a description of 1..{FEATURE_TEXT_CHARS} characters"
    return None


def _layer_list_problem(value: Any) -> str | None:
    names = [name.strip() for name in value.split(",")]
    if not value.strip() or any(not name for name in names):
        return 'expected "all_dense" or comma-separated layer names, e.g. "hidden,probs"'
    if "all_dense" in names and len(names) > 1:
        return '"all_dense" already names every Dense layer; list names or use it alone'
    return None


@dataclass(frozen=True)
class LlmConfig:
    """Aggregation weights proposed by an LLM (flq_algorithm.weighting = "llm"; extra `llm`).

    The API key is read from the environment variable named by api_key_env, never from this file.
    Any failure (timeout, HTTP error, invalid answer, low confidence) falls back to sample-count
    weights for that round, with the reason recorded in the results."""

    provider: LlmProvider = field(default="gemini", metadata=rule("LLM provider."))
    model: str = field(
        default="gemini-2.5-flash",
        metadata=rule("Model name the provider serves.", check=_non_empty, allowed="non-empty"),
    )
    api_key_env: str = field(
        default="GEMINI_API_KEY",
        metadata=rule(
            "Environment variable holding the API key (the key itself never goes in a file).",
            check=_env_name_problem,
            allowed="an environment variable name",
        ),
    )
    cache_rounds: int = field(
        default=5,
        metadata=rule(
            "Ask the model every N rounds and reuse its weights in between (1 = every round).",
            minimum=1,
        ),
    )
    min_confidence: float = field(
        default=0.5,
        metadata=rule(
            "Answers with a lower self-reported confidence fall back to sample weights.",
            minimum=0,
            maximum=1,
        ),
    )
    timeout_s: float = field(
        default=10.0,
        metadata=rule("The round waits at most this long (s) for the model's answer.", above=0),
    )
    max_clients_in_prompt: int = field(
        default=50,
        metadata=rule(
            "Most contributors one prompt describes; with more, the model is asked about this "
            "many (half the most anomalous by their update statistics, the rest the largest by "
            "samples) and the others keep their sample weights.",
            minimum=1,
        ),
    )
    features: dict[str, str] = field(
        default_factory=dict,
        metadata=rule(
            "What the workers' --feature values mean, told to the model: a table "
            '`name = "description (unit)"`, e.g. `[llm.features]` `traffic_mbps = "uplink '
            'traffic over the last minute, Mbit/s"`.',
            check=_feature_meanings_problem,
            allowed="a table of name = text",
        ),
    )
    base_url: str = field(
        default="",
        metadata=rule(
            "API endpoint (a proxy or a compatible server); empty = FLQ_LLM_BASE_URL from the "
            "environment, else the provider's own.",
            check=_http_url_problem,
            allowed="empty or http(s)://host[:port][/path]",
        ),
    )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA-only federation: target Dense layers get low-rank adapters, every base weight stays
    frozen (identical on every node by seed), and only the adapters are trained and sent."""

    rank: int = field(
        default=0, metadata=rule("Adapter rank; 0 = LoRA off (the whole model travels).", minimum=0)
    )
    alpha: float = field(
        default=0.0,
        metadata=rule("Adapter scale numerator (scale = alpha / rank); 0 = rank.", minimum=0),
    )
    target_layers: str = field(
        default="all_dense",
        metadata=rule(
            'Dense layers that get adapters: "all_dense", or comma-separated layer names '
            "(mlp: hidden, probs; cnn: fc, probs; logreg: probs).",
            check=_layer_list_problem,
            allowed='"all_dense" or names',
        ),
    )
    base: str = field(
        default="",
        metadata=rule(
            "Pretrained weights for the frozen base (.keras, .weights.h5 or .npz; the same file "
            "on every node). Empty: the seeded random base, on which adapters learn little.",
            check=_weights_file_problem,
            allowed="empty or .keras/.weights.h5/.npz",
        ),
    )


def _layer_names_problem(value: Any) -> str | None:
    names = [name.strip() for name in value.split(",")]
    if not value.strip() or any(not name for name in names):
        return 'expected comma-separated Dense layer names, e.g. "probs" or "fc,probs"'
    return None


@dataclass(frozen=True)
class FusionConfig:
    """Knowledge fusion: after each server step the master moves knowledge from a large teacher
    model it holds into the global model, on data only the master holds (docs/architecture.md).

    The change goes down to the workers like any other global update (quantized downlink, bits
    counted); no uplink bit is spent. A fusion that fails in a round (an error, a non-finite
    loss or model) is skipped for that round and recorded in rounds.csv's `fusion` column."""

    method: FusionMethod = field(
        default="none",
        metadata=rule(
            "none; distill (train the global model a few steps on the server's data against the "
            "teacher's softened outputs and the labels); param_attention (MergeNet-style: a small "
            "attention module maps the teacher's parameters to an adjustment of chosen student "
            "layers, trained with the student's loss)."
        ),
    )
    teacher: str = field(
        default="",
        metadata=rule(
            "The teacher: a Keras model file (.keras or .h5) taking the dataset's samples and "
            "returning class probabilities. Needed unless method = none."
        ),
    )
    server_share: float = field(
        default=0.0,
        metadata=rule(
            "Share of the built-in training set the master holds out as its own data (stratified, "
            "by system.seed) and removes from every worker's partition, whatever the method, so "
            "runs with and without fusion train workers on the same data; 0 = none.",
            minimum=0,
            below=1,
        ),
    )
    start_round: int = field(
        default=2, metadata=rule("First round after which fusion runs.", minimum=1)
    )
    every: int = field(
        default=1, metadata=rule("Fuse after every N-th round from start_round.", minimum=1)
    )
    steps: int = field(
        default=10,
        metadata=rule("Optimizer steps per fusion (minibatches of server data).", minimum=1),
    )
    batch_size: int = field(
        default=64, metadata=rule("Minibatch size of the fusion steps.", minimum=1)
    )
    lr: float = field(
        default=1e-3,
        metadata=rule(
            "Adam learning rate of the fusion steps (its moments restart each fusion for "
            "distill; the attention module keeps its optimizer across rounds).",
            above=0,
        ),
    )
    temperature: float = field(
        default=2.0,
        metadata=rule(
            "Distillation temperature: teacher and student logits are divided by it.", above=0
        ),
    )
    label_weight: float = field(
        default=0.5,
        metadata=rule(
            "distill: weight of the labels' cross-entropy beside the teacher's softened outputs "
            "(1 - label_weight, times temperature^2); 0 = the teacher alone.",
            minimum=0,
            maximum=1,
        ),
    )
    student_layers: str = field(
        default="probs",
        metadata=rule(
            "param_attention: Dense layers of the student it adjusts (mlp: hidden, probs; cnn: "
            "fc, probs); each is paired with the teacher's layer of that name, the output layer "
            "with the teacher's output layer.",
            check=_layer_names_problem,
            allowed="layer names",
        ),
    )
    attention_dim: int = field(
        default=64, metadata=rule("param_attention: width of the attention module.", minimum=1)
    )
    attention_heads: int = field(
        default=8, metadata=rule("param_attention: attention heads.", minimum=1)
    )
    attention_blocks: int = field(
        default=2, metadata=rule("param_attention: stacked cross-attention blocks.", minimum=1)
    )


@dataclass(frozen=True)
class RayConfig:
    """`flq simulate --ray`: what each simulated worker (one Ray actor) reserves on the cluster."""

    num_cpus: float = field(
        default=1.0,
        metadata=rule(
            "CPUs each simulated worker reserves (Ray's num_cpus); its TensorFlow thread pools "
            "get as many threads, rounded up (0: reserve none, TensorFlow picks).",
            minimum=0,
        ),
    )
    num_gpus: float = field(
        default=0.0,
        metadata=rule(
            "GPUs each simulated worker reserves (Ray's num_gpus; a fraction shares a GPU).",
            minimum=0,
        ),
    )
    start_timeout_s: float = field(
        default=300.0,
        metadata=rule(
            "How long (s) the workers may take to be placed and built (data, model) before the "
            "simulation gives up, naming those still pending (e.g. the cluster lacks the CPUs "
            "or GPUs they reserve).",
            above=0,
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole config: one frozen dataclass per section of the file."""

    system: SystemConfig = field(default_factory=SystemConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flq_algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    lazy_selection: LazyConfig = field(default_factory=LazyConfig)
    budget_selection: BudgetConfig = field(default_factory=BudgetConfig)
    jetson_optimization: JetsonConfig = field(default_factory=JetsonConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass(frozen=True)
class Alias:
    """Another spelling of a key, converted to it on load (`master_address` -> `master_url`)."""

    section: str
    key: str
    target: str
    help: str
    check: Callable[[Any], str | None]
    to_target: Callable[[str], str]


ALIASES = (
    Alias(
        "system",
        "master_address",
        "master_url",
        '"host:port", instead of master_url (it becomes http://host:port).',
        _master_address_problem,
        lambda address: f"http://{address}",
    ),
)


# Other spellings of a choice, stored as the choice: the original FLQ's own values.
CHOICE_ALIASES: dict[tuple[str, str], dict[str, str]] = {
    ("dataset", "name"): {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"},
    ("dataset", "partition"): {"non_iid": "dirichlet", "non-iid": "dirichlet"},
}


# ---------------------------------------------------------------- the table, read back


@dataclass(frozen=True)
class Setting:
    """One key of one section, as the dataclasses declare it."""

    section: str
    key: str
    kind: type  # bool, int, float, str, or dict (a table of strings)
    choices: tuple[str, ...]  # non-empty for Literal fields
    default: Any
    rule: Rule


SECTION_TYPES: dict[str, type] = dict(get_type_hints(Config))  # section name -> its dataclass


def _kind_of(hint: Any) -> tuple[type, tuple[str, ...]]:
    if get_origin(hint) is Literal:
        return str, tuple(get_args(hint))
    if get_origin(hint) is dict:  # dict[str, str]: a table of names and texts
        return dict, ()
    return hint, ()


def _default_of(item: dataclasses.Field[Any]) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _collect_settings() -> dict[str, dict[str, Setting]]:
    table: dict[str, dict[str, Setting]] = {}
    for section, section_type in SECTION_TYPES.items():
        hints = get_type_hints(section_type)
        table[section] = {}
        for item in dataclasses.fields(section_type):
            kind, choices = _kind_of(hints[item.name])
            rule = item.metadata[_RULE_KEY]
            table[section][item.name] = Setting(
                section, item.name, kind, choices, _default_of(item), rule
            )
    return table


_SETTINGS = _collect_settings()


def iter_settings() -> Iterator[Setting]:
    """Every key of every section, in file order (for docs and CLIs)."""
    for section in _SETTINGS.values():
        yield from section.values()


def _aliases_in(section: str) -> dict[str, Alias]:
    return {alias.key: alias for alias in ALIASES if alias.section == section}


# ---------------------------------------------------------------- checking one value


def _is_comment(key: Any) -> bool:
    # JSON has no comments; `_comment`, `_comment_lr`, ... keys carry them and are ignored.
    return isinstance(key, str) and key.startswith("_comment")


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list):
        return "array"
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A value as the user wrote it in the file (true, "text", 3)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _number(value: float) -> str:
    return f"{value:g}"


def _range_text(rule: Rule) -> str:
    if rule.minimum is not None and rule.maximum is not None:
        text = f"{_number(rule.minimum)}..{_number(rule.maximum)}"
    elif rule.above is not None and rule.below is not None:
        text = f"{_number(rule.above)} < x < {_number(rule.below)}"
    else:
        bounds = [
            (">=", rule.minimum),
            (">", rule.above),
            ("<=", rule.maximum),
            ("<", rule.below),
        ]
        text = " and ".join(f"{op} {_number(b)}" for op, b in bounds if b is not None)
    return " or ".join([text, *map(str, rule.also)]) if text else rule.allowed


def _in_range(rule: Rule, value: float) -> bool:
    if value in rule.also:
        return True
    # Written as "ok if" so a NaN fails every bound.
    return all(
        (
            rule.minimum is None or value >= rule.minimum,
            rule.maximum is None or value <= rule.maximum,
            rule.above is None or value > rule.above,
            rule.below is None or value < rule.below,
        )
    )


_WRONG_TYPE = object()  # what a converter returns for a value of the wrong type


def _to_bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _WRONG_TYPE  # no 0/1 for booleans


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):  # bool is an int subclass; true is not 1 in a config
        return _WRONG_TYPE
    if isinstance(value, int):
        return value
    # 20.0 and 1e3 are integers written as floats (JSON and TOML exponents make floats).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _WRONG_TYPE


def _to_float(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _WRONG_TYPE
    try:
        return float(value)  # an int is fine where a float is expected (17000000 bits)
    except OverflowError:
        return math.inf  # an int too large for a float; reported as not finite


def _to_str(value: Any) -> Any:
    return value if isinstance(value, str) else _WRONG_TYPE


def _to_str_table(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return _WRONG_TYPE
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return _WRONG_TYPE
    return dict(value)


_CONVERTERS: dict[type, tuple[Callable[[Any], Any], str]] = {
    bool: (_to_bool, "true or false"),
    int: (_to_int, "an integer"),
    float: (_to_float, "a number"),
    str: (_to_str, "a string"),
    dict: (_to_str_table, 'a table of strings, e.g. { name = "text" }'),
}


def _typed(item: Setting, value: Any, where: str) -> Any:
    """The value converted to the key's type, or a ConfigError saying what type was expected."""
    convert, wanted = _CONVERTERS[item.kind]
    converted = convert(value)
    if converted is _WRONG_TYPE:
        raise ConfigError(
            f"{where} = {_show(value)} has type {_type_name(value)}; expected {wanted}"
        )
    return converted


def _problem(rule: Rule, value: Any) -> str | None:
    """What is wrong with a value of the right type (finite, range, check), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int | float) and not _in_range(rule, value):
        return f"is out of range; allowed: {_range_text(rule)}"
    problem = rule.check(value) if rule.check else None
    return f"is invalid: {problem}" if problem else None


def _choice(item: Setting, value: str, where: str) -> str:
    # Case-insensitive so the original files' "INFO" and "MNIST" load; stored canonical.
    aliases = CHOICE_ALIASES.get((item.section, item.key), {})
    spelled = aliases.get(value.lower(), value.lower())
    if spelled in item.choices:
        return spelled
    # Aliases count as spellings: "fmnistt" is closest to "fmnist", which means fashion-mnist.
    close = difflib.get_close_matches(spelled, [*item.choices, *aliases], n=1)
    hint = f" (did you mean {aliases.get(close[0], close[0])!r}?)" if close else ""
    raise ConfigError(
        f"{where} = {_show(value)} is not a valid choice{hint}; "
        f"choose one of: {', '.join(item.choices)}"
    )


def _value(item: Setting, raw: Any, source: str) -> Any:
    """The key's value from what the file holds; errors quote the value as it was written."""
    where = f"{source}: {item.section}.{item.key}"
    value = _typed(item, raw, where)
    if item.choices:
        return _choice(item, value, where)
    problem = _problem(item.rule, value)
    if problem:
        raise ConfigError(f"{where} = {_show(raw)} {problem}")
    return value


# ---------------------------------------------------------------- sections and the whole


def _unknown_key(section: str, key: Any, source: str) -> ConfigError:
    valid = [*_SETTINGS[section], *_aliases_in(section)]
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"{source}: unknown key {str(key)!r} in section [{section}]{hint} "
        f"(valid keys: {', '.join(valid)})"
    )


def _resolve_aliases(section: str, raw: Mapping[Any, Any], source: str) -> dict[Any, Any]:
    resolved = dict(raw)
    for alias in _aliases_in(section).values():
        if alias.key not in resolved:
            continue
        where = f"{source}: {section}.{alias.key}"
        if alias.target in resolved:
            raise ConfigError(f"{where}: set {alias.key} or {alias.target}, not both")
        value = resolved.pop(alias.key)
        if not isinstance(value, str):
            raise ConfigError(
                f"{where} = {_show(value)} has type {_type_name(value)}; expected a string"
            )
        problem = alias.check(value)
        if problem:
            raise ConfigError(f"{where} = {_show(value)} is invalid: {problem}")
        resolved[alias.target] = alias.to_target(value)
    return resolved


def _section(section: str, raw: Any, source: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: section [{section}] must be a table of keys, got {_type_name(raw)}"
        )
    values: dict[str, Any] = {}
    for key, value in _resolve_aliases(section, raw, source).items():
        if _is_comment(key):
            continue
        item = _SETTINGS[section].get(key)
        if item is None:
            raise _unknown_key(section, key, source)
        values[key] = _value(item, value, source)
    return SECTION_TYPES[section](**values)


def _cross_field_problems(cfg: Config) -> Iterator[str]:
    system = cfg.system
    if system.min_workers > system.total_workers:
        yield (
            f"system.min_workers = {system.min_workers} is more than system.total_workers = "
            f"{system.total_workers}; the master would wait for workers that never come"
        )
    algo = cfg.flq_algorithm
    if algo.mode == "bbit" and algo.bbit_block > 0 and algo.b_up < 2:
        yield (
            f"flq_algorithm.b_up = {algo.b_up} with bbit_block = {algo.bbit_block}: the block grid "
            "needs b_up >= 2 (one bit leaves no level but 0); raise b_up or set bbit_block = 0"
        )
    yield from _fusion_problems(cfg)
    yield from _user_code_problems(cfg)
    security = cfg.security
    if bool(security.tls_cert) != bool(security.tls_key):
        yield "security.tls_cert and security.tls_key must be set together"
    if security.require_client_cert and not (security.tls_ca and security.tls_cert):
        yield "security.require_client_cert needs security.tls_ca and security.tls_cert"


def config_warnings(cfg: Config) -> list[str]:
    """Settings that load and run but likely not as meant: `flq config check` prints them and
    the master logs them at start-up."""
    warnings = []
    llm, workers = cfg.llm, cfg.system.total_workers
    if cfg.flq_algorithm.weighting == "llm" and workers > llm.max_clients_in_prompt:
        warnings.append(
            f"llm.max_clients_in_prompt = {llm.max_clients_in_prompt} < system.total_workers = "
            f"{workers}: each question describes {llm.max_clients_in_prompt} of the contributors "
            "(half the most anomalous, the rest the largest by samples); the others keep their "
            "sample weights"
        )
    if cfg.lora.rank > 0 and not (cfg.lora.base or cfg.model.weights):
        warnings.append(
            f"lora.rank = {cfg.lora.rank} without lora.base: the adapters sit on a random frozen "
            "base and learn little (the CNN stays near chance); set lora.base to a pretrained "
            "model's weights file"
        )
    algo = cfg.flq_algorithm
    if algo.mode == "stc" and algo.server_optimizer in ("adam", "yogi", "adagrad"):
        warnings.append(
            f"flq_algorithm.mode = 'stc' with server_optimizer = {algo.server_optimizer!r}: an "
            "adaptive step normalises each coordinate, so a value that arrives once in ~1/density "
            "rounds moves it ~30 x server_lr whatever its size; on Fashion-MNIST this levelled "
            "off at ~0.78 where 'avg' (with model.lr ~0.1) reached 0.85 (docs/benchmarks.md)"
        )
    return warnings


def _fusion_problems(cfg: Config) -> Iterator[str]:
    fusion = cfg.fusion
    if fusion.method == "none":
        return
    if not fusion.teacher:
        yield f"fusion.method = {fusion.method!r} needs fusion.teacher (a Keras model file)"
    if cfg.dataset.name == "synthetic":
        yield f"fusion.method = {fusion.method!r} needs a Keras model; dataset synthetic has none"
    if fusion.server_share == 0:
        yield (
            f"fusion.method = {fusion.method!r} needs server data: set fusion.server_share "
            "(e.g. 0.1) to hold out a share of the training set for the master"
        )
    if fusion.attention_dim % fusion.attention_heads:
        yield (
            f"fusion.attention_dim = {fusion.attention_dim} is not a multiple of "
            f"fusion.attention_heads = {fusion.attention_heads}"
        )
    if cfg.lora.rank > 0:
        yield "fusion with lora.rank > 0 is not supported: fusion changes the whole model"


def _user_code_problems(cfg: Config) -> Iterator[str]:
    dataset, model = cfg.dataset, cfg.model
    if dataset.loader and dataset.name == "synthetic":
        yield (
            f'dataset.loader = {_show(dataset.loader)} with dataset.name = "synthetic": the '
            "synthetic problem brings its own data; drop one of them"
        )
    elif dataset.name == "synthetic" and (model.builder or model.weights):
        key = "builder" if model.builder else "weights"
        yield (
            f'model.{key} with dataset.name = "synthetic": the synthetic problem has its own '
            "linear model, not a Keras one; set dataset.loader or another dataset.name"
        )


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate a sectioned mapping (a parsed file); missing sections and keys get defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {_type_name(data)}")
    for name in data:
        if name not in SECTION_TYPES and not _is_comment(name):
            raise ConfigError(
                f"{source}: unknown section [{name}] (valid sections: {', '.join(SECTION_TYPES)})"
            )
    cfg = Config(**{name: _section(name, data.get(name, {}), source) for name in SECTION_TYPES})
    for problem in _cross_field_problems(cfg):
        raise ConfigError(f"{source}: {problem}")
    return cfg


def default_config() -> Config:
    """Every key at its default."""
    return config_from_dict({}, source="<defaults>")


# ---------------------------------------------------------------- files


class _DuplicateKeyError(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; in a config that hides a mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{source}: key {exc.args[0]!r} appears twice in one object") from None


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


_PARSERS: dict[str, Callable[[str, str], Any]] = {".toml": _parse_toml, ".json": _parse_json}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None


def _parsed_file(file: Path) -> Any:
    parse = _PARSERS.get(file.suffix.lower())
    if parse is None:
        raise ConfigError(
            f"{file}: unsupported config file type {file.suffix or '(no suffix)'!r}; "
            f"use {' or '.join(_PARSERS)}"
        )
    return parse(_read_text(file), str(file))


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a .toml or .json config file; None gives the defaults."""
    if path is None:
        return default_config()
    file = Path(path)
    return config_from_dict(_parsed_file(file), source=str(file))


def keys_set_in(path: str | os.PathLike[str]) -> set[str]:
    """The "section.key"s a config file sets itself (an alias counts as the key it spells), so a
    caller with defaults of its own (flq demo) overrides only the rest. Load the file first:
    this assumes it is valid."""
    data = _parsed_file(Path(path))
    keys: set[str] = set()
    for section, table in data.items():
        if not isinstance(table, Mapping):
            continue
        aliases = _aliases_in(section)
        for key in table:
            if not _is_comment(key):
                keys.add(f"{section}.{aliases[key].target if key in aliases else key}")
    return keys


# ---------------------------------------------------------------- out again


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The fully resolved config as plain sections of str/int/float/bool (JSON and TOML-able)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTION_TYPES}


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of cfg with {"section.key": value} applied and validated exactly like a file."""
    data: dict[str, dict[str, Any]] = config_to_dict(cfg)
    for dotted, value in overrides.items():
        section, dot, key = str(dotted).partition(".")
        if not (section and dot and key):
            raise ConfigError(
                f"<overrides>: {dotted!r} must be section.key, e.g. 'flq_algorithm.mode'"
            )
        table = data.setdefault(section, {})
        alias = _aliases_in(section).get(key)
        if alias is not None:
            table.pop(alias.target, None)  # the alias replaces the resolved value it spells
        table[key] = value
    return config_from_dict(data, source="<overrides>")


def _toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    """One config value in TOML syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form; 1e-05 and 1.7e+16 are valid TOML
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):  # an inline table: { "name" = "text", ... }
        pairs = ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {pairs} }}" if pairs else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def dumps_toml(cfg: Config) -> str:
    """The resolved config as TOML text, every default filled in."""
    lines = ["# FLQ config, fully resolved: every key with its value or default."]
    for section, values in config_to_dict(cfg).items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the reference in docs/config.md

REFERENCE_BEGIN = "<!-- BEGIN GENERATED REFERENCE: flq.config.reference_markdown() -->"
REFERENCE_END = "<!-- END GENERATED REFERENCE -->"


def _allowed_text(item: Setting) -> str:
    if item.choices:
        aliases = CHOICE_ALIASES.get((item.section, item.key), {})
        also = "".join(f" (also `{alias}` = `{to}`)" for alias, to in aliases.items())
        return ", ".join(f"`{choice}`" for choice in item.choices) + also
    if item.kind is bool:
        return "`true`, `false`"
    return _range_text(item.rule) or "any"


def _reference_row(item: Setting) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "string", dict: "table"}[item.kind]
    original = "✓" if item.rule.original else ""
    cells = [
        f"`{item.key}`",
        kind,
        f"`{_toml_value(item.default)}`",
        _allowed_text(item),
        original,
        item.rule.help,
    ]
    return "| " + " | ".join(cells) + " |"


def _reference_section(section: str) -> list[str]:
    doc = (SECTION_TYPES[section].__doc__ or "").strip()
    lines = [f"### `[{section}]`", "", doc, ""]
    lines += ["| key | type | default | allowed | FLQ | meaning |", "|---|---|---|---|---|---|"]
    lines += [_reference_row(item) for item in _SETTINGS[section].values()]
    for alias in _aliases_in(section).values():
        lines += ["", f"Also accepted: `{alias.key}` = {alias.help}"]
    return [*lines, ""]


def reference_markdown() -> str:
    """The key reference of docs/config.md, generated from the table above."""
    lines: list[str] = []
    for section in SECTION_TYPES:
        lines += _reference_section(section)
    return "\n".join(lines)


def sync_reference_doc(path: str | os.PathLike[str]) -> bool:
    """Rewrite the generated block of a Markdown file; True when it changed."""
    doc = Path(path)
    text = doc.read_text(encoding="utf-8")
    head, begin, rest = text.partition(REFERENCE_BEGIN)
    _, end, tail = rest.partition(REFERENCE_END)
    if not (begin and end):
        raise ValueError(f"{doc}: markers {REFERENCE_BEGIN!r} ... {REFERENCE_END!r} not found")
    new = f"{head}{REFERENCE_BEGIN}\n{reference_markdown()}\n{REFERENCE_END}{tail}"
    if new != text:
        doc.write_text(new, encoding="utf-8")
    return new != text


def generated_reference_in(text: str) -> str:
    """The generated block of a Markdown text (what sync_reference_doc writes), or ''."""
    _, _, rest = text.partition(REFERENCE_BEGIN + "\n")
    block, end, _ = rest.partition("\n" + REFERENCE_END)
    return block if end else ""

"""Aggregation weights proposed by an LLM (Gemini, through the google-genai SDK), never trusted
blindly and never waited on for longer than `timeout_s`.

`LlmAdvisor` is a `WeightAdvisor` (flq/master/advice.py). It wraps a fallback rule (sample
counts) instead of replacing it:

- every `cache_rounds` rounds it asks the model, through the SDK's async client, for JSON that
  follows a response schema: one weight per worker id, a short reasoning, a confidence in [0, 1].
  The prompt gives per worker its samples, freshness, losses, location, stated features (with
  their meaning from `llm.features`) and the statistics of its update (norm, agreement with the
  round's aggregate and with the others, change since its last upload), and the server's view
  (rounds done of max, global accuracy and loss and their trend);
- in between it reuses the last accepted answer (source "cache") while that answer covers every
  contributor; a new contributor triggers a fresh question;
- more contributors than `max_clients_in_prompt`: it asks about that many (half the most
  anomalous by their statistics, the rest the largest by samples); the answer divides the sample
  share of those asked among them, and the others keep their sample weights;
- the answer is validated: every contributor asked about present, no stranger, weights finite
  and >= 0 with a positive sum, confidence >= min_confidence;
- anything else (no key, no SDK, timeout, HTTP error or quota, invalid JSON, missing or extra
  workers, bad weights, low confidence) gives that round the fallback's weights, with source
  "fallback:<reason>" and the detail in `reasoning`;
- a failed call (timeout, quota, network, HTTP error) is not repeated next round: the advisor
  backs off for max(2, cache_rounds) rounds, doubling with each failure in a row (at most
  BACKOFF_MAX_ROUNDS), so an outage costs one timeout per backoff, not one per round. Those
  rounds fall back with reason "backoff".

The API key comes from the environment variable the config names and is never logged. google-genai
is the optional extra `llm`, imported only when the advisor is built.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from flq.algorithm import SampleWeighting, Weighting
from flq.config import LlmConfig
from flq.master.advice import ContributorFacts, ServerSignals, loss_trend, rounded
from flq.master.results import compact_weights, one_line
from flq.master.state import WeightDecision
from flq.types import Location

log = structlog.get_logger("flq.master.llm")

BASE_URL_ENV = "FLQ_LLM_BASE_URL"
SDK_BASE_URL_ENV = "GOOGLE_GEMINI_BASE_URL"  # google-genai's own override
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"  # the SDK's Gemini API endpoint
LOSSES_IN_PROMPT = 5
EVALUATIONS_IN_PROMPT = 5
HTTP_GRACE_S = 1.0  # the SDK's own HTTP timeout sits behind ours, so ours always fires first
BACKOFF_MAX_ROUNDS = 64
QUIET_REASONS = ("backoff", "no_api_key", "sdk_missing")  # said once at start, not every round

SYSTEM_INSTRUCTION = """\
You choose the aggregation weights of one round of federated learning. The server forms the
weighted mean of the workers' model updates (FedAvg weighs by sample count). Give each listed
worker a non-negative weight; they are normalised to sum to 1. Prefer workers whose updates are
likely to help: more samples, recently falling local loss, fresh updates (staleness 0 means it
uploaded this round; stale contributions are reused from earlier rounds). Each worker's "update"
describes its current update: its norm and norm_ratio (norm / the median norm),
cosine_with_aggregate (agreement with the sample-weighted mean of all updates) and
cosine_with_others (with the mean of the other workers' updates: low or negative values mean it
disagrees with the rest, as a worker with corrupted labels or a broken sensor would), and
change_since_last_upload (how much its last upload moved it, relative). Down-weight workers whose
update disagrees with the rest, whose norm is far from the others', whose loss rises or is far
above the others, and very stale contributions; when all updates agree, sample counts are right.
"server" gives the run's progress: rounds done of the maximum and the global model's test
accuracy and loss (and their trend). Location and features describe each worker's situation;
"feature_meanings" says what each feature means. Answer with JSON only: "weights" (one entry for
every listed worker id and no other), "reasoning" (one or two short sentences) and "confidence"
(0 to 1: how sure you are that these weights beat sample counts)."""


# ---------------------------------------------------------------- what the model is told


def worker_entry(facts: ContributorFacts) -> dict[str, Any]:
    """One worker as the prompt lists it (JSON-able, no NaN)."""
    losses = facts.recent_losses[-LOSSES_IN_PROMPT:]
    entry: dict[str, Any] = {
        "worker_id": facts.worker_id,
        "samples": facts.num_samples,
        "staleness_rounds": facts.staleness,
        "uploaded_this_round": facts.fresh,
        "bits_sent": facts.uplink_bits,
        "recent_losses": [rounded(x) for x in losses],
        "loss_trend": loss_trend(losses),
    }
    if facts.update is not None:
        stats = facts.update
        entry["update"] = {
            "norm": rounded(stats.norm),
            "norm_ratio": rounded(stats.norm_ratio),
            "cosine_with_aggregate": rounded(stats.cosine),
            "cosine_with_others": rounded(stats.cosine_others),
            "change_since_last_upload": None if stats.change is None else rounded(stats.change),
        }
    location = _location(facts.location)
    if location:
        entry["location"] = location
    if facts.features:
        entry["features"] = {k: rounded(v) for k, v in sorted(facts.features.items())}
    return entry


def server_entry(server: ServerSignals) -> dict[str, Any]:
    """The run as the server sees it: progress, and the global model's recent evaluations."""
    evaluations = server.evaluations[-EVALUATIONS_IN_PROMPT:]
    entry: dict[str, Any] = {
        "rounds_done": server.round - 1,
        "max_rounds": server.max_rounds,
        "global_test": [
            {"round": e.round, "accuracy": rounded(e.accuracy), "loss": rounded(e.loss)}
            for e in evaluations
        ],
        "global_test_loss_trend": loss_trend([e.loss for e in evaluations]),
    }
    if server.train_losses:
        train = server.train_losses[-LOSSES_IN_PROMPT:]
        entry["mean_train_loss_trend"] = loss_trend(train)
    return entry


@dataclass(frozen=True)
class Unlisted:
    """The contributors a prompt does not list (more than max_clients_in_prompt)."""

    count: int
    sample_share: float  # their share of all contributors' samples


def build_prompt(
    round_id: int,
    contributors: Sequence[ContributorFacts],
    server: ServerSignals | None = None,
    feature_meanings: Mapping[str, str] | None = None,
    unlisted: Unlisted | None = None,
) -> str:
    lines = ",\n".join(json.dumps(worker_entry(c), allow_nan=False) for c in contributors)
    text = f"Round {round_id}. {len(contributors)} workers contribute to this round's aggregate.\n"
    if unlisted is not None:
        text = (
            f"Round {round_id}. {len(contributors) + unlisted.count} workers contribute to this "
            f"round's aggregate; {unlisted.count} not listed here keep their sample weights "
            f"({unlisted.sample_share:.1%} of the samples). Your weights divide the listed "
            "workers' share among them.\n"
        )
    if server is not None:
        text += f"Server (JSON): {json.dumps(server_entry(server), allow_nan=False)}\n"
    named = sorted({name for c in contributors for name in c.features})
    if named:
        meanings = feature_meanings or {}
        described = {n: meanings.get(n, "no description given") for n in named}
        text += f"Feature meanings (JSON): {json.dumps(described)}\n"
    return text + f"Workers (JSON):\n[\n{lines}\n]\n"


def response_schema(worker_ids: Sequence[str]) -> dict[str, Any]:
    """The JSON the model must answer with (Gemini's OpenAPI-subset schema)."""
    entry = {
        "type": "OBJECT",
        "properties": {
            "worker_id": {"type": "STRING", "enum": list(worker_ids)},
            "weight": {"type": "NUMBER"},
        },
        "required": ["worker_id", "weight"],
    }
    return {
        "type": "OBJECT",
        "properties": {
            "weights": {"type": "ARRAY", "items": entry},
            "reasoning": {"type": "STRING"},
            "confidence": {"type": "NUMBER"},
        },
        "required": ["weights", "reasoning", "confidence"],
    }


# ---------------------------------------------------------------- more workers than one prompt


def anomaly(facts: ContributorFacts) -> float:
    """How unusual a worker's update is: disagreement with the others (1 - cosine, 0..2) plus
    how far its norm is from the median (|log ratio|). 0 without statistics."""
    stats = facts.update
    if stats is None:
        return 0.0
    spread = abs(math.log(stats.norm_ratio)) if stats.norm_ratio > 0 else 10.0
    return (1.0 - stats.cosine_others) + spread


def choose_listed(contributors: Sequence[ContributorFacts], limit: int) -> list[ContributorFacts]:
    """The `limit` contributors a prompt lists: half the most anomalous, the rest the largest
    by samples (so the answer can move weight from the odd ones to the bulk), in id order."""
    by_anomaly = sorted(contributors, key=lambda c: (-anomaly(c), -c.num_samples, c.worker_id))
    chosen = {c.worker_id for c in by_anomaly[: limit // 2] if c.update is not None}
    by_samples = sorted(contributors, key=lambda c: (-c.num_samples, c.worker_id))
    for facts in by_samples:
        if len(chosen) >= limit:
            break
        chosen.add(facts.worker_id)
    return [c for c in contributors if c.worker_id in chosen]


def blend(
    listed_weights: Mapping[str, float], contributors: Sequence[ContributorFacts]
) -> dict[str, float]:
    """Weights for every contributor: those not asked about keep their sample share, the
    answer's (normalised) weights divide the asked ones' share among them."""
    samples = {c.worker_id: float(c.num_samples) for c in contributors}
    if math.fsum(samples.values()) <= 0:
        samples = dict.fromkeys(samples, 1.0)  # no counts yet: equal shares
    total = math.fsum(samples.values())
    asked = [w for w in samples if w in listed_weights]
    share = math.fsum(samples[w] for w in asked) / total
    listed_total = math.fsum(listed_weights[w] for w in asked)
    weights = {w: samples[w] / total for w in samples if w not in listed_weights}
    for worker_id in asked:
        part = listed_weights[worker_id] / listed_total if listed_total > 0 else 1 / len(asked)
        weights[worker_id] = share * part
    return weights


# ---------------------------------------------------------------- checking the answer


class AnswerRejected(ValueError):
    """The model answered, but not with weights we can use; `reason` is the short token."""

    def __init__(self, reason: str, detail: str, confidence: float = math.nan) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.confidence = confidence


@dataclass(frozen=True)
class Proposal:
    weights: dict[str, float]  # normalised, one per contributor
    confidence: float
    reasoning: str


def parse_answer(text: str, worker_ids: Sequence[str], min_confidence: float) -> Proposal:
    """The model's answer as normalised weights, or AnswerRejected saying what is wrong."""
    if not text or not text.strip():
        raise AnswerRejected("empty_answer", "the model returned no text")
    try:
        answer = json.loads(text)
    except ValueError as error:
        raise AnswerRejected("invalid_json", f"not JSON: {error}") from None
    if not isinstance(answer, dict):
        raise AnswerRejected("invalid_json", f"expected a JSON object, got {type(answer).__name__}")
    raw = _weights_of(answer.get("weights"))
    expected = set(worker_ids)
    missing = sorted(expected - set(raw))
    if missing:
        raise AnswerRejected("missing_workers", f"no weight for {', '.join(missing)}")
    extra = sorted(set(raw) - expected)
    if extra:
        raise AnswerRejected("extra_workers", f"weights for unknown {', '.join(extra)}")
    for worker_id, weight in raw.items():
        if not math.isfinite(weight) or weight < 0:
            raise AnswerRejected("bad_weights", f"{worker_id}: {weight} is not finite and >= 0")
    total = math.fsum(raw.values())
    if total <= 0:
        raise AnswerRejected("bad_weights", "the weights sum to 0")
    stated: Any = answer.get("confidence")
    if not _is_number(stated) or not 0.0 <= float(stated) <= 1.0:
        raise AnswerRejected("bad_confidence", f"confidence {stated!r} is not in [0, 1]")
    confidence = float(stated)
    reasoning = one_line(answer.get("reasoning"))
    if confidence < min_confidence:
        raise AnswerRejected(
            "low_confidence",
            f"confidence {confidence:.2f} < min_confidence {min_confidence:.2f} ({reasoning})",
            confidence=confidence,
        )
    weights = {w: raw[w] / total for w in worker_ids}
    return Proposal(weights, confidence, reasoning)


def _weights_of(value: Any) -> dict[str, float]:
    """[{"worker_id", "weight"}, ...] (the schema's form) or {"id": weight} (tolerated)."""
    pairs: list[tuple[Any, Any]]
    if isinstance(value, list):
        if not all(isinstance(e, dict) and {"worker_id", "weight"} <= set(e) for e in value):
            raise AnswerRejected(
                "invalid_json", "weights: expected entries {worker_id, weight} for every worker"
            )
        pairs = [(e["worker_id"], e["weight"]) for e in value]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise AnswerRejected("invalid_json", "weights: missing, or neither a list nor an object")
    weights: dict[str, float] = {}
    for worker_id, weight in pairs:
        if not isinstance(worker_id, str):
            raise AnswerRejected("invalid_json", f"worker id {worker_id!r} is not a string")
        if worker_id in weights:
            raise AnswerRejected("invalid_json", f"{worker_id} is weighted twice")
        if not _is_number(weight):
            raise AnswerRejected("bad_weights", f"{worker_id}: {weight!r} is not a number")
        weights[worker_id] = float(weight)
    return weights


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- the advisor


@dataclass(frozen=True)
class LlmSettings:
    model: str = "gemini-2.5-flash"
    api_key_env: str = "GEMINI_API_KEY"
    base_url: str = DEFAULT_BASE_URL  # the endpoint actually asked
    base_url_from: str = "default"  # config | $FLQ_LLM_BASE_URL | $GOOGLE_GEMINI_BASE_URL | default
    cache_rounds: int = 5
    min_confidence: float = 0.5
    timeout_s: float = 10.0
    max_clients_in_prompt: int = 50
    feature_meanings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: LlmConfig, environ: Mapping[str, str] | None = None) -> LlmSettings:
        env = os.environ if environ is None else environ
        base_url, source = resolve_base_url(cfg.base_url, env)
        return cls(
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            base_url=base_url,
            base_url_from=source,
            cache_rounds=cfg.cache_rounds,
            min_confidence=cfg.min_confidence,
            timeout_s=cfg.timeout_s,
            max_clients_in_prompt=cfg.max_clients_in_prompt,
            feature_meanings=dict(cfg.features),
        )


def resolve_base_url(configured: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """The endpoint the SDK will call and where that choice came from, in the order they win."""
    if configured:
        return configured, "config"
    for variable in (BASE_URL_ENV, SDK_BASE_URL_ENV):
        if environ.get(variable):
            return environ[variable], f"${variable}"
    return DEFAULT_BASE_URL, "default"


@dataclass(frozen=True)
class _Cached:
    round: int
    proposal: Proposal
    partial: bool  # asked about a subset; the others keep sample weights


class LlmAdvisor:
    """The LLM's weights every `cache_rounds` rounds, the cache in between, the rule on failure,
    a backoff after a failed call."""

    name = "llm"

    def __init__(
        self,
        settings: LlmSettings,
        fallback: Weighting | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.timeout_s = settings.timeout_s
        self.rule: Weighting = fallback or SampleWeighting()
        env = os.environ if environ is None else environ
        self._api_key = env.get(settings.api_key_env, "")  # never logged
        self._cache: _Cached | None = None
        self._failures = 0  # failed calls in a row
        self._next_ask = 0  # no question before this round (backoff)
        self.asked = 0  # questions sent to the model (for tests and the summary)
        self.sources: Counter[str] = Counter()  # decisions by source, for the summary
        # Built here, in the thread that builds the federation: importing the SDK and building a
        # client (TLS context, HTTP pools) takes 0.1-1 s that must not count against a round.
        self._sdk, self._sdk_problem = _import_sdk()
        self._client = self._make_client() if self._api_key and self._sdk else None
        self._log_start()

    @classmethod
    def from_config(cls, cfg: LlmConfig, environ: Mapping[str, str] | None = None) -> LlmAdvisor:
        return cls(LlmSettings.from_config(cfg, environ), environ=environ)

    def _log_start(self) -> None:
        settings = self.settings
        where = {"endpoint": settings.base_url, "endpoint_from": settings.base_url_from}
        if not self._api_key:
            log.warning(
                "no LLM API key: every round falls back to sample weights",
                variable=settings.api_key_env,
                **where,
            )
        elif self._client is None:
            log.warning("LLM SDK missing: every round falls back", detail=self._sdk_problem)
        else:
            log.info("LLM advisor ready", model=settings.model, **where)

    def summary(self) -> dict[str, Any]:
        """For summary.json: where the advisor asked, and what its rounds were."""
        settings = self.settings
        return {
            "model": settings.model,
            "endpoint": settings.base_url,
            "endpoint_from": settings.base_url_from,
            "api_key_env": settings.api_key_env,
            "api_key_set": bool(self._api_key),
            "questions": self.asked,
            "rounds_by_source": dict(sorted(self.sources.items())),
        }

    # ------------------------------------------------------------ WeightAdvisor

    async def advise(
        self,
        round_id: int,
        contributors: Sequence[ContributorFacts],
        server: ServerSignals | None = None,
    ) -> WeightDecision:
        decision = await self._decide(round_id, contributors, server)
        self.sources[decision.source] += 1
        return decision

    async def _decide(
        self,
        round_id: int,
        contributors: Sequence[ContributorFacts],
        server: ServerSignals | None,
    ) -> WeightDecision:
        if not contributors:
            return self.fallback(contributors, "no_contributors", "nobody has uploaded yet")
        cached = self._from_cache(round_id, contributors)
        if cached is not None:
            return cached
        if not self._api_key:
            return self.fallback(
                contributors, "no_api_key", f"${self.settings.api_key_env} is not set"
            )
        if self._client is None:
            return self.fallback(contributors, "sdk_missing", self._sdk_problem)
        if round_id < self._next_ask:
            return self.fallback(
                contributors,
                "backoff",
                f"not asking before round {self._next_ask}: {self._failures} failed call(s) "
                "in a row",
            )
        return await self._question(round_id, contributors, server)

    async def _question(
        self,
        round_id: int,
        contributors: Sequence[ContributorFacts],
        server: ServerSignals | None,
    ) -> WeightDecision:
        limit = self.settings.max_clients_in_prompt
        listed = list(contributors)
        unlisted = None
        if len(contributors) > limit:
            listed = choose_listed(contributors, limit)
            listed_ids = {c.worker_id for c in listed}
            rest = blend(dict.fromkeys(listed_ids, 1.0), contributors)
            unlisted = Unlisted(
                len(contributors) - len(listed),
                math.fsum(v for w, v in rest.items() if w not in listed_ids),
            )
        ids = [c.worker_id for c in listed]
        prompt = build_prompt(round_id, listed, server, self.settings.feature_meanings, unlisted)
        began = time.monotonic()
        try:
            text = await asyncio.wait_for(
                self._ask(prompt, response_schema(ids)), self.settings.timeout_s
            )
        except asyncio.TimeoutError:
            return self._call_failed(
                round_id,
                contributors,
                "timeout",
                f"no answer within {self.settings.timeout_s:g} s from {self.settings.base_url}",
            )
        except Exception as error:  # the SDK's HTTP errors, network errors, anything else
            reason, detail = _classify(error)
            return self._call_failed(
                round_id, contributors, reason, f"{detail} (endpoint {self.settings.base_url})"
            )
        self._failures, self._next_ask = 0, 0
        try:
            proposal = parse_answer(text, ids, self.settings.min_confidence)
        except AnswerRejected as rejected:
            return self.fallback(
                contributors, rejected.reason, rejected.detail, confidence=rejected.confidence
            )
        self._cache = _Cached(round_id, proposal, partial=unlisted is not None)
        weights = dict(proposal.weights)
        reasoning = proposal.reasoning
        if unlisted is not None:
            weights = blend(proposal.weights, contributors)
            reasoning = f"{reasoning} [asked about {len(ids)} of {len(contributors)}]"
        log.info(
            "LLM aggregation weights",
            source="llm",
            confidence=proposal.confidence,
            weights=compact_weights(weights),
            reasoning=reasoning,
            seconds=round(time.monotonic() - began, 3),
        )
        return WeightDecision(weights, "llm", proposal.confidence, reasoning)

    def _call_failed(
        self, round_id: int, contributors: Sequence[ContributorFacts], reason: str, detail: str
    ) -> WeightDecision:
        """The call got no answer: back off, so an outage costs one wait, not one per round."""
        self._failures += 1
        pause = min(
            BACKOFF_MAX_ROUNDS, max(2, self.settings.cache_rounds) * 2 ** (self._failures - 1)
        )
        self._next_ask = round_id + pause
        log.warning(
            "LLM call failed: backing off",
            reason=reason,
            detail=one_line(detail),
            failures_in_a_row=self._failures,
            next_question_round=self._next_ask,
        )
        return self.fallback(contributors, reason, detail)

    def fallback(
        self,
        contributors: Sequence[ContributorFacts],
        reason: str,
        detail: str = "",
        *,
        confidence: float = math.nan,
    ) -> WeightDecision:
        ids = [c.worker_id for c in contributors]
        samples = {c.worker_id: c.num_samples for c in contributors}
        say = log.info if reason in QUIET_REASONS else log.warning
        say("LLM weighting fell back to sample weights", reason=reason, detail=one_line(detail))
        return WeightDecision(
            self.rule.weights(ids, samples),
            f"fallback:{reason}",
            confidence,
            one_line(detail),
        )

    # ------------------------------------------------------------ internals

    def _from_cache(
        self, round_id: int, contributors: Sequence[ContributorFacts]
    ) -> WeightDecision | None:
        cached = self._cache
        if cached is None or round_id - cached.round >= self.settings.cache_rounds:
            return None
        answered = cached.proposal.weights
        ids = [c.worker_id for c in contributors]
        if cached.partial:
            # The others kept sample weights when it was asked, and newcomers do now.
            known = {w: answered[w] for w in ids if w in answered}
            if not known:
                return None
            weights = blend(known, contributors)
        elif set(ids) <= set(answered):
            weights = {w: answered[w] for w in ids}
        else:
            return None  # a newcomer: the old answer does not weigh it, ask again
        return WeightDecision(
            weights, "cache", cached.proposal.confidence, cached.proposal.reasoning
        )

    async def aclose(self) -> None:
        """Close the SDK client's connections (the daemon and the simulator call this last)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aio.aclose()
            client.close()

    def _make_client(self) -> Any:
        assert self._sdk is not None
        genai, types = self._sdk
        http_options = types.HttpOptions(
            base_url=self.settings.base_url,
            timeout=int((self.settings.timeout_s + HTTP_GRACE_S) * 1000),
            # One attempt: a retry could not fit in the round's wait, and a failed round falls
            # back anyway; the next question comes after the backoff.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        return genai.Client(api_key=self._api_key, vertexai=False, http_options=http_options)

    async def _ask(self, prompt: str, schema: dict[str, Any]) -> str:
        """One generateContent call through the SDK's async client; returns the answer's text."""
        assert self._client is not None and self._sdk is not None
        _, types = self._sdk
        self.asked += 1
        response = await self._client.aio.models.generate_content(
            model=self.settings.model,
            contents=prompt,
            config=types.GenerateContentConfig(
                system_instruction=SYSTEM_INSTRUCTION,
                response_mime_type="application/json",
                response_schema=schema,
                temperature=0.0,
            ),
        )
        return response.text or ""


def _import_sdk() -> tuple[tuple[Any, Any] | None, str]:
    """(google.genai, google.genai.types), or None and why (the optional extra `llm`)."""
    try:
        from google import genai
        from google.genai import types
    except ImportError as error:
        return None, f"google-genai is not installed ({error}); pip install 'flq[llm]'"
    return (genai, types), ""


def _classify(error: Exception) -> tuple[str, str]:
    """A short reason token and a one-line detail for a failed call."""
    code = getattr(error, "code", None)
    if isinstance(code, int) and 100 <= code <= 599:
        status = getattr(error, "status", None) or ""
        if code == 429:
            return "quota", f"HTTP 429 {status}".strip()
        return f"http_{code}", f"HTTP {code} {status}".strip()
    module = type(error).__module__.split(".")[0]
    if module in {"httpx", "httpx2", "httpcore", "aiohttp"} or isinstance(error, OSError):
        return "network", f"{type(error).__name__}: {error}"
    return "error", f"{type(error).__name__}: {error}"


def _location(loc: Location) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if loc.latitude is not None and loc.longitude is not None:
        out.update(latitude=loc.latitude, longitude=loc.longitude)
    if loc.site:
        out["site"] = loc.site
    return out

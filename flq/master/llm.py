"""Aggregation weights proposed by an LLM (Gemini, through the google-genai SDK), never trusted
blindly and never waited on for longer than `timeout_s`.

The seam: after a round's uploads land, the round engine hands a `WeightAdvisor` one
`ContributorFacts` per worker whose contribution counts this round and awaits a `WeightDecision`
(weights, source, confidence, reasoning); the master's step then aggregates with those weights.

`LlmAdvisor` is that advisor. It wraps a fallback rule (sample counts) instead of replacing it:

- every `cache_rounds` rounds it asks the model, through the SDK's async client, for JSON that
  follows a response schema: one weight per worker id, a short reasoning, a confidence in [0, 1];
- in between it reuses the last accepted answer (source "cache") while that answer covers every
  contributor; a new contributor triggers a fresh question;
- the answer is validated: every contributor present, no stranger, weights finite and >= 0 with a
  positive sum, confidence >= min_confidence;
- anything else (no key, no SDK, timeout, HTTP error or quota, invalid JSON, missing or extra
  workers, bad weights, low confidence, too many contributors for one prompt) gives that round
  the fallback's weights, with source "fallback:<reason>" and the detail in `reasoning`.

The API key comes from the environment variable the config names and is never logged. google-genai
is the optional extra `llm`, imported only when a question is actually asked.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from flq.algorithm import SampleWeighting, Weighting
from flq.config import LlmConfig
from flq.master.registry import WorkerRecord
from flq.master.results import compact_weights, one_line
from flq.master.state import WeightDecision
from flq.types import Location

log = structlog.get_logger("flq.master.llm")

BASE_URL_ENV = "FLQ_LLM_BASE_URL"
LOSSES_IN_PROMPT = 5
ADVICE_GRACE_S = 1.0  # beyond the advisor's own timeout, which bounds its call to the model
HTTP_GRACE_S = 1.0  # the SDK's own HTTP timeout sits behind ours, so ours always fires first

SYSTEM_INSTRUCTION = """\
You choose the aggregation weights of one round of federated learning. The server forms the
weighted mean of the workers' model updates (FedAvg weighs by sample count). Give each listed
worker a non-negative weight; they are normalised to sum to 1. Prefer workers whose updates are
likely to help: more samples, recently falling local loss, fresh updates (staleness 0 means it
uploaded this round; stale contributions are reused from earlier rounds). Down-weight workers
whose loss rises or is far above the others, and very stale contributions. Location and the
optional features describe each worker's situation (site, traffic, usage). Answer with JSON only:
"weights" (one entry for every listed worker id and no other), "reasoning" (one or two short
sentences) and "confidence" (0 to 1: how sure you are that these weights beat sample counts)."""


# ---------------------------------------------------------------- what the advisor is told


@dataclass(frozen=True)
class ContributorFacts:
    """One worker whose contribution counts in this round's aggregate, as the prompt shows it."""

    worker_id: str
    num_samples: int
    fresh: bool  # uploaded this round
    staleness: int | None  # rounds since its last upload; None: unknown (e.g. after a restart)
    uplink_bits: int
    recent_losses: tuple[float, ...] = ()
    location: Location = field(default_factory=Location)
    features: Mapping[str, float] = field(default_factory=dict)

    def to_prompt(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "worker_id": self.worker_id,
            "samples": self.num_samples,
            "staleness_rounds": self.staleness,
            "uploaded_this_round": self.fresh,
            "bits_sent": self.uplink_bits,
            "recent_losses": [_round(x) for x in self.recent_losses[-LOSSES_IN_PROMPT:]],
            "loss_trend": loss_trend(self.recent_losses[-LOSSES_IN_PROMPT:]),
        }
        location = _location(self.location)
        if location:
            entry["location"] = location
        if self.features:
            entry["features"] = {k: _round(v) for k, v in sorted(self.features.items())}
        return entry


def facts_for(
    worker_id: str, record: WorkerRecord | None, round_id: int, fresh: bool
) -> ContributorFacts:
    """What the registry knows about a contributor (a contributor it has no record of — after a
    master restart, before the worker reconnects — is described by its id alone)."""
    if record is None:
        return ContributorFacts(worker_id, 0, fresh, None, 0)
    last = record.last_upload_round
    return ContributorFacts(
        worker_id=worker_id,
        num_samples=record.num_samples,
        fresh=fresh,
        staleness=round_id - last if last >= 0 else None,
        uplink_bits=record.uplink_bits,
        recent_losses=tuple(x for x in record.recent_losses if math.isfinite(x)),
        location=record.location,
        features=dict(getattr(record, "features", {})),
    )


def loss_trend(losses: Sequence[float]) -> dict[str, Any]:
    """Least-squares slope of the recent losses per round, and a word for it (1 % of the mean
    loss per round separates "falling"/"rising" from "flat")."""
    if len(losses) < 2:
        return {"slope": None, "direction": "unknown"}
    n = len(losses)
    mean_x, mean_y = (n - 1) / 2, math.fsum(losses) / n
    slope = math.fsum((i - mean_x) * (y - mean_y) for i, y in enumerate(losses)) / math.fsum(
        (i - mean_x) ** 2 for i in range(n)
    )
    flat = 0.01 * abs(mean_y)
    direction = "falling" if slope < -flat else "rising" if slope > flat else "flat"
    return {"slope": _round(slope), "direction": direction}


def build_prompt(round_id: int, contributors: Sequence[ContributorFacts]) -> str:
    lines = ",\n".join(json.dumps(c.to_prompt(), allow_nan=False) for c in contributors)
    return (
        f"Round {round_id}. {len(contributors)} workers contribute to this round's aggregate.\n"
        f"Workers (JSON):\n[\n{lines}\n]\n"
    )


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


# ---------------------------------------------------------------- the seam and the advisor


class WeightAdvisor(Protocol):
    """Proposes a round's aggregation weights; the engine awaits it for at most `timeout_s`."""

    timeout_s: float

    async def advise(
        self, round_id: int, contributors: Sequence[ContributorFacts]
    ) -> WeightDecision: ...

    def fallback(
        self, contributors: Sequence[ContributorFacts], reason: str, detail: str = ""
    ) -> WeightDecision: ...


async def advise_within(
    advisor: WeightAdvisor, round_id: int, contributors: Sequence[ContributorFacts]
) -> WeightDecision:
    """The advisor's weights, waited on for at most its timeout (plus a grace the advisor itself
    never needs); an overrun or any error is the advisor's fallback, so advice costs a round
    nothing but its own answer."""
    try:
        return await asyncio.wait_for(
            advisor.advise(round_id, contributors), advisor.timeout_s + ADVICE_GRACE_S
        )
    except asyncio.TimeoutError:
        return advisor.fallback(contributors, "timeout", "the advisor overran its timeout")
    except Exception as error:  # an advisor's bug must cost one round's advice, not the round
        log.exception("weight advisor failed", error=type(error).__name__)
        return advisor.fallback(contributors, "error", f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class LlmSettings:
    model: str = "gemini-2.5-flash"
    api_key_env: str = "GEMINI_API_KEY"
    base_url: str = ""  # empty: the SDK's default endpoint
    cache_rounds: int = 5
    min_confidence: float = 0.5
    timeout_s: float = 10.0
    max_clients_in_prompt: int = 50

    @classmethod
    def from_config(cls, cfg: LlmConfig, environ: Mapping[str, str] | None = None) -> LlmSettings:
        env = os.environ if environ is None else environ
        return cls(
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            base_url=cfg.base_url or env.get(BASE_URL_ENV, ""),
            cache_rounds=cfg.cache_rounds,
            min_confidence=cfg.min_confidence,
            timeout_s=cfg.timeout_s,
            max_clients_in_prompt=cfg.max_clients_in_prompt,
        )


@dataclass(frozen=True)
class _Cached:
    round: int
    proposal: Proposal


class LlmAdvisor:
    """The LLM's weights every `cache_rounds` rounds, the cache in between, the rule on failure."""

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
        self.asked = 0  # questions sent to the model (for tests and metrics)
        # Built here, in the thread that builds the federation: importing the SDK and building a
        # client (TLS context, HTTP pools) takes 0.1-1 s that must not count against a round.
        self._sdk, self._sdk_problem = _import_sdk()
        self._client = self._make_client() if self._api_key and self._sdk else None
        if not self._api_key:
            log.warning(
                "no LLM API key: every round falls back to sample weights",
                variable=settings.api_key_env,
            )

    @classmethod
    def from_config(cls, cfg: LlmConfig, environ: Mapping[str, str] | None = None) -> LlmAdvisor:
        return cls(LlmSettings.from_config(cfg, environ), environ=environ)

    # ------------------------------------------------------------ WeightAdvisor

    async def advise(
        self, round_id: int, contributors: Sequence[ContributorFacts]
    ) -> WeightDecision:
        ids = [c.worker_id for c in contributors]
        if not ids:
            return self.fallback(contributors, "no_contributors", "nobody has uploaded yet")
        cached = self._from_cache(round_id, ids)
        if cached is not None:
            return cached
        if len(ids) > self.settings.max_clients_in_prompt:
            return self.fallback(
                contributors,
                "too_many_clients",
                f"{len(ids)} contributors > max_clients_in_prompt "
                f"{self.settings.max_clients_in_prompt}",
            )
        if not self._api_key:
            return self.fallback(
                contributors, "no_api_key", f"${self.settings.api_key_env} is not set"
            )
        if self._client is None:
            return self.fallback(contributors, "sdk_missing", self._sdk_problem)
        began = time.monotonic()
        try:
            text = await asyncio.wait_for(
                self._ask(build_prompt(round_id, contributors), response_schema(ids)),
                self.settings.timeout_s,
            )
        except asyncio.TimeoutError:
            return self.fallback(
                contributors, "timeout", f"no answer within {self.settings.timeout_s:g} s"
            )
        except Exception as error:  # the SDK's HTTP errors, network errors, anything else
            reason, detail = _classify(error)
            return self.fallback(contributors, reason, detail)
        try:
            proposal = parse_answer(text, ids, self.settings.min_confidence)
        except AnswerRejected as rejected:
            return self.fallback(
                contributors, rejected.reason, rejected.detail, confidence=rejected.confidence
            )
        self._cache = _Cached(round_id, proposal)
        log.info(
            "LLM aggregation weights",
            source="llm",
            confidence=proposal.confidence,
            weights=compact_weights(proposal.weights),
            reasoning=proposal.reasoning,
            seconds=round(time.monotonic() - began, 3),
        )
        return WeightDecision(proposal.weights, "llm", proposal.confidence, proposal.reasoning)

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
        log.warning(
            "LLM weighting fell back to sample weights", reason=reason, detail=one_line(detail)
        )
        return WeightDecision(
            self.rule.weights(ids, samples),
            f"fallback:{reason}",
            confidence,
            one_line(detail),
        )

    # ------------------------------------------------------------ internals

    def _from_cache(self, round_id: int, ids: Sequence[str]) -> WeightDecision | None:
        cached = self._cache
        if cached is None or round_id - cached.round >= self.settings.cache_rounds:
            return None
        if not set(ids) <= set(cached.proposal.weights):
            return None  # a newcomer: the old answer does not weigh it, ask again
        weights = {w: cached.proposal.weights[w] for w in ids}
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
            base_url=self.settings.base_url or None,
            timeout=int((self.settings.timeout_s + HTTP_GRACE_S) * 1000),
            # One attempt: a retry could not fit in the round's wait, and a failed round falls
            # back anyway; the next question comes with a later round.
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


def _round(value: float) -> float | None:
    return round(float(value), 5) if math.isfinite(value) else None


def _location(loc: Location) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if loc.latitude is not None and loc.longitude is not None:
        out.update(latitude=loc.latitude, longitude=loc.longitude)
    if loc.site:
        out["site"] = loc.site
    return out

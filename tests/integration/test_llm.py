"""LLM-proposed aggregation weights: the real google-genai SDK against a stand-in Gemini server on
127.0.0.1 (tests/gemini_standin.py), the round engine in memory and over gRPC, and `flq demo
--weighting llm` as real processes. Every failure path must fall back to sample weights with its
reason recorded."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from flq import serde
from flq.admin import AdminTarget, admin_client
from flq.config import Config, default_config, with_overrides
from flq.demo import child_env
from flq.master.advice import ContributorFacts
from flq.master.federation import build_federation
from flq.master.llm import BASE_URL_ENV, LlmAdvisor, LlmSettings
from flq.master.results import read_rounds
from flq.pb import flq_pb2 as pb
from flq.sim import simulate_async
from flq.synthetic import SyntheticEvaluation, SyntheticProblem, SyntheticTrainer
from flq.types import Location, StatusReply
from flq.worker.connection import Backoff, run_connected
from flq.worker.session import SessionOptions, WorkerState
from tests.gemini_standin import (
    API_KEY,
    INTERNAL,
    QUOTA,
    GeminiStandIn,
    Reply,
    proposal,
    ranked_proposal,
    running,
)
from tests.loopback import start_synthetic_master

PROBLEM = SyntheticProblem(dim=20, samples_per_worker=48, seed=9)
FACTS = [
    ContributorFacts(
        "w0",
        100,
        True,
        0,
        4096,
        (2.0, 1.5, 1.2),
        Location(48.1, 11.5, "greenhouse-3"),
        {"traffic_mbps": 3.5},
    ),
    ContributorFacts("w1", 300, False, 2, 2048, (1.0, 1.1, 1.3)),
]
SAMPLE_WEIGHTS = {"w0": 100.0, "w1": 300.0}
KEY_ENV = {"GEMINI_API_KEY": API_KEY}


@pytest.fixture
def standin() -> Iterator[GeminiStandIn]:
    with running() as server:
        yield server


def advisor(server: GeminiStandIn, **settings: Any) -> LlmAdvisor:
    return LlmAdvisor(LlmSettings(base_url=server.base_url, **settings), environ=KEY_ENV)


async def advise(adv: LlmAdvisor, round_id: int, facts: list[ContributorFacts] = FACTS) -> Any:
    try:
        return await adv.advise(round_id, facts)
    finally:
        await adv.aclose()


def test_a_valid_answer_becomes_the_rounds_weights(standin: GeminiStandIn) -> None:
    standin.script(Reply(text=proposal({"w0": 1.0, "w1": 3.0}, confidence=0.8)))
    decision = asyncio.run(advise(advisor(standin, model="gemini-test"), 7))
    assert decision.source == "llm"
    assert decision.weights == pytest.approx({"w0": 0.25, "w1": 0.75})
    assert decision.confidence == 0.8 and "falling loss" in decision.reasoning
    # What went over the wire: the real SDK's generateContent call, the key in its header.
    (request,) = standin.requests
    assert request.path.endswith("/models/gemini-test:generateContent")
    assert request.headers["x-goog-api-key"] == API_KEY
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert request.worker_ids == ["w0", "w1"]  # the response schema allows exactly these ids
    w0, w1 = request.workers
    assert w0["location"] == {"latitude": 48.1, "longitude": 11.5, "site": "greenhouse-3"}
    assert w0["features"] == {"traffic_mbps": 3.5}
    assert w0["loss_trend"]["direction"] == "falling" and w1["loss_trend"]["direction"] == "rising"
    assert (w0["staleness_rounds"], w1["staleness_rounds"]) == (0, 2)
    assert (w0["samples"], w1["bits_sent"], w0["recent_losses"]) == (100, 2048, [2.0, 1.5, 1.2])
    assert "location" not in w1 and "Round 7." in request.prompt


@pytest.mark.parametrize(
    ("reply", "source"),
    [
        (Reply(text="the weights are w0=1, w1=2"), "fallback:invalid_json"),
        (QUOTA, "fallback:quota"),
        (INTERNAL, "fallback:http_500"),
        (Reply(text=proposal({"w0": 1.0, "w1": 1.0}, confidence=0.2)), "fallback:low_confidence"),
        (Reply(text=proposal({"w0": 1.0})), "fallback:missing_workers"),
        (Reply(text=proposal({"w0": 1.0, "w1": 1.0, "w7": 1.0})), "fallback:extra_workers"),
        (Reply(text=proposal({"w0": -1.0, "w1": 2.0})), "fallback:bad_weights"),
        (Reply(text=proposal({"w0": 0.0, "w1": 0.0})), "fallback:bad_weights"),
        (Reply(text=proposal({"w0": 1.0, "w1": 1.0}, confidence=7.0)), "fallback:bad_confidence"),
        (Reply(text=""), "fallback:empty_answer"),
    ],
    ids=[
        "malformed-json",
        "http-429",
        "http-500",
        "low-confidence",
        "missing-worker",
        "extra-worker",
        "negative-weight",
        "zero-sum",
        "confidence-out-of-range",
        "empty",
    ],
)
def test_every_bad_answer_falls_back_to_sample_weights_with_its_reason(
    standin: GeminiStandIn, reply: Reply, source: str
) -> None:
    standin.script(reply)
    with capture_logs() as logs:
        decision = asyncio.run(advise(advisor(standin, min_confidence=0.5), 3))
    assert decision.source == source
    assert decision.weights == SAMPLE_WEIGHTS
    assert decision.reasoning  # the detail of why, for the results and `flq status`
    assert len(standin.requests) == 1  # the SDK did not retry behind our back
    fell_back = [e for e in logs if e["event"].startswith("LLM weighting fell back")]
    assert [e["reason"] for e in fell_back] == [source.removeprefix("fallback:")]
    assert API_KEY not in repr(logs)


def test_low_confidence_keeps_the_confidence_it_was_given(standin: GeminiStandIn) -> None:
    standin.script(Reply(text=proposal({"w0": 1.0, "w1": 1.0}, confidence=0.2)))
    decision = asyncio.run(advise(advisor(standin, min_confidence=0.5), 1))
    assert decision.confidence == pytest.approx(0.2)
    assert "0.20 < min_confidence 0.50" in decision.reasoning


def test_a_slow_answer_is_not_waited_for(standin: GeminiStandIn) -> None:
    standin.script(Reply(text=proposal({"w0": 1.0, "w1": 1.0}), delay_s=3.0))
    began = time.monotonic()
    decision = asyncio.run(advise(advisor(standin, timeout_s=0.3), 1))
    waited = time.monotonic() - began
    assert decision.source == "fallback:timeout" and decision.weights == SAMPLE_WEIGHTS
    assert waited < 2.5  # gave up long before the answer came (3 s)


def test_an_unreachable_endpoint_falls_back() -> None:
    server = GeminiStandIn().start()
    url = server.base_url
    server.stop()  # nothing listens there any more
    adv = LlmAdvisor(LlmSettings(base_url=url, timeout_s=5.0), environ=KEY_ENV)
    decision = asyncio.run(advise(adv, 1))
    assert decision.source == "fallback:network" and decision.weights == SAMPLE_WEIGHTS
    assert f"(endpoint {url})" in decision.reasoning  # which endpoint failed, for the operator


def test_the_answer_is_reused_for_cache_rounds_and_asked_again_after(
    standin: GeminiStandIn,
) -> None:
    adv = advisor(standin, cache_rounds=3)
    newcomer = [*FACTS, ContributorFacts("w2", 50, True, 0, 100)]

    async def rounds() -> list[str]:
        sources = []
        for round_id in (1, 2, 3, 4):
            sources.append((await adv.advise(round_id, FACTS)).source)
        sources.append((await adv.advise(5, newcomer)).source)  # w2 is not in the cached answer
        standin.script(INTERNAL)
        sources.append((await adv.advise(8, newcomer)).source)  # expired; the ask fails
        await adv.aclose()
        return sources

    sources = asyncio.run(rounds())
    assert sources == ["llm", "cache", "cache", "llm", "llm", "fallback:http_500"]
    assert len(standin.requests) == adv.asked == 4


def test_after_a_failed_call_the_advisor_backs_off_doubling_each_time(
    standin: GeminiStandIn,
) -> None:
    """An outage costs one failed call per backoff, not one per round: cache_rounds 2 pauses
    2 rounds after the first failure, 4 after the second; an answer ends the backoff."""
    adv = advisor(standin, cache_rounds=2)
    standin.script(QUOTA, QUOTA)

    async def rounds() -> list[Any]:
        decisions = [await adv.advise(r, FACTS) for r in range(1, 10)]
        await adv.aclose()
        return decisions

    with capture_logs() as logs:
        decisions = asyncio.run(rounds())
    assert [d.source.removeprefix("fallback:") for d in decisions] == [
        "quota",  # 1: asks, fails -> no question before round 3
        "backoff",
        "quota",  # 3: asks, fails again -> none before round 7
        "backoff",
        "backoff",
        "backoff",
        "llm",  # 7: asks, answered
        "cache",
        "llm",
    ]
    assert len(standin.requests) == 4
    assert all(d.weights == SAMPLE_WEIGHTS for d in decisions[:6])
    assert "not asking before round 7: 2 failed call(s)" in decisions[4].reasoning
    said = [e for e in logs if e["event"] == "LLM call failed: backing off"]
    assert [e["next_question_round"] for e in said] == [3, 7]
    quiet = [e for e in logs if e.get("reason") == "backoff"]
    assert quiet and all(e["log_level"] == "info" for e in quiet)  # one warning per failure


def test_cached_weights_are_those_of_the_answer(standin: GeminiStandIn) -> None:
    adv = advisor(standin, cache_rounds=2)

    async def two() -> tuple[Any, Any]:
        first = await adv.advise(1, FACTS)
        second = await adv.advise(2, FACTS[:1])  # w1's contribution no longer counts
        await adv.aclose()
        return first, second

    first, second = asyncio.run(two())
    assert first.weights == pytest.approx({"w0": 1 / 3, "w1": 2 / 3})  # ranked: 1 and 2
    assert second.source == "cache" and second.weights == pytest.approx({"w0": 1 / 3})


def test_without_a_key_nothing_is_sent_and_start_up_says_so(standin: GeminiStandIn) -> None:
    with capture_logs() as logs:
        adv = LlmAdvisor(LlmSettings(base_url=standin.base_url), environ={})
    (said,) = [e for e in logs if e["event"].startswith("no LLM API key")]
    assert said["variable"] == "GEMINI_API_KEY" and said["endpoint"] == standin.base_url
    decision = asyncio.run(advise(adv, 1))
    assert decision.source == "fallback:no_api_key" and standin.requests == []
    assert adv.summary()["api_key_set"] is False


def test_more_contributors_than_one_prompt_ask_about_a_subset(standin: GeminiStandIn) -> None:
    """w1 (300 samples) is asked about; w0 keeps its sample share; the next round reuses the
    answer for w1 and w0 keeps its share again."""
    adv = advisor(standin, max_clients_in_prompt=1, cache_rounds=2)

    async def two() -> tuple[Any, Any]:
        first = await adv.advise(1, FACTS)
        second = await adv.advise(2, FACTS)
        await adv.aclose()
        return first, second

    first, second = asyncio.run(two())
    (request,) = standin.requests
    assert request.worker_ids == ["w1"] and [w["worker_id"] for w in request.workers] == ["w1"]
    assert "1 not listed here keep their sample weights (25.0% of the samples)" in request.prompt
    assert first.source == "llm" and "[asked about 1 of 2]" in first.reasoning
    assert first.weights == pytest.approx({"w0": 0.25, "w1": 0.75})
    assert second.source == "cache" and second.weights == pytest.approx(first.weights)


def test_base_url_comes_from_the_environment_when_the_config_has_none() -> None:
    cfg = with_overrides(default_config(), {"llm.cache_rounds": 2})
    settings = LlmSettings.from_config(cfg.llm, {BASE_URL_ENV: "http://127.0.0.1:9"})
    assert settings.base_url == "http://127.0.0.1:9" and settings.cache_rounds == 2
    assert settings.base_url_from == f"${BASE_URL_ENV}"
    cfg = with_overrides(cfg, {"llm.base_url": "http://proxy:8080"})
    configured = LlmSettings.from_config(cfg.llm, {BASE_URL_ENV: "x"})
    assert (configured.base_url, configured.base_url_from) == ("http://proxy:8080", "config")


# ---------------------------------------------------------------- inside a federation


def llm_config(base_url: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "system.total_workers": 3,
        "system.min_workers": 3,
        "system.max_rounds": 5,
        "system.round_timeout_s": 10.0,
        "system.master_url": "http://127.0.0.1:0",
        "model.lr": 0.05,
        "model.local_steps": 1,
        "dataset.batch_size": 16,
        "flq_algorithm.mode": "bbit",
        "flq_algorithm.b_down": 32,
        "flq_algorithm.weighting": "llm",
        "lazy_selection.warmup": 0,
        "llm.base_url": base_url,
        "llm.cache_rounds": 2,
    }
    values.update(overrides)
    return with_overrides(default_config(), values)


def test_the_engine_aggregates_with_the_llm_weights_and_records_them(
    standin: GeminiStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", API_KEY)
    cfg = llm_config(standin.base_url)
    # Round 1 asks (ranked answer), 2 reuses it, 3 asks and gets HTTP 500, 4 backs off, 5 asks.
    standin.script(ranked_proposal, INTERNAL)
    federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
    trainers = [SyntheticTrainer(PROBLEM, i) for i in range(3)]
    rows: list[dict[str, Any]] = []
    asyncio.run(
        simulate_async(
            cfg, tmp_path, on_round=rows.append, trainers=trainers, federation=federation
        )
    )
    assert [r["weights_source"] for r in rows] == [
        "llm",
        "cache",
        "fallback:http_500",
        "fallback:backoff",
        "llm",
    ]
    ranked = "w0:0.1667;w1:0.3333;w2:0.5"
    equal = "w0:0.3333;w1:0.3333;w2:0.3333"  # sample counts, all 48
    assert [r["weights_used"] for r in rows] == [ranked, ranked, equal, equal, ranked]
    assert [r["llm_confidence"] for r in rows] == ["0.900000"] * 2 + ["nan"] * 2 + ["0.900000"]
    assert rows[2]["llm_reasoning"] == f"HTTP 500 INTERNAL (endpoint {standin.base_url})"
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # it still learns
    # The weights reached the aggregate: each worker's accumulated weight is the sum used.
    store = federation.state.store
    assert store.weight_used("w2") == pytest.approx(3 * 0.5 + 2 / 3)
    # The prompt of round 5 carried the update statistics and the server's view of the run.
    last = standin.requests[-1]
    assert "Round 5." in last.prompt
    server = json.loads(last.prompt.partition("Server (JSON): ")[2].partition("\n")[0])
    assert (server["rounds_done"], server["max_rounds"]) == (4, 5)
    assert [e["round"] for e in server["global_test"]] == [1, 2, 3, 4]
    for worker in last.workers:
        update = worker["update"]
        assert update["norm"] > 0 and -1 <= update["cosine_with_others"] <= 1
        assert update["change_since_last_upload"] is not None  # everyone uploaded before
    on_disk = read_rounds(tmp_path / "rounds.csv")
    assert [r["weights_source"] for r in on_disk] == [r["weights_source"] for r in rows]


def test_the_agreement_rule_down_weights_a_worker_whose_labels_are_wrong(tmp_path: Path) -> None:
    """weighting = "agreement": the same statistics the LLM is shown, decided by a rule. w2's
    labels are negated, so its update points against the others' and it loses its weight."""
    overrides = {"flq_algorithm.weighting": "agreement", "system.max_rounds": 4}
    overrides.update({"system.total_workers": 5, "system.min_workers": 5})
    cfg = llm_config("", **overrides)
    trainers = [SyntheticTrainer(PROBLEM, i) for i in range(5)]
    trainers[2].y = -trainers[2].y
    rows: list[dict[str, Any]] = []
    federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
    asyncio.run(
        simulate_async(
            cfg, tmp_path, on_round=rows.append, trainers=trainers, federation=federation
        )
    )
    assert [r["weights_source"] for r in rows] == ["agreement"] * 4
    for row in rows:
        weights = dict(cell.split(":") for cell in row["weights_used"].split(";"))
        assert float(weights["w2"]) < 0.05 < min(float(weights["w0"]), float(weights["w1"]))
        assert "w2 x0." in row["llm_reasoning"]


async def _status(port: int) -> StatusReply:
    async with admin_client(AdminTarget(f"127.0.0.1:{port}")) as client:
        return await client.status()


def test_over_grpc_the_prompt_carries_what_workers_report_and_status_shows_the_weights(
    standin: GeminiStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", API_KEY)
    cfg = llm_config(standin.base_url, **{"system.max_rounds": 1000, "llm.cache_rounds": 1})
    sites = {
        "w0": SessionOptions(
            heartbeat_interval_s=0.5,
            location=Location(latitude=52.5, longitude=13.4, site="roof"),
            features={"traffic_mbps": 12.5, "cpu_load": 0.75},
        ),
        "w1": SessionOptions(heartbeat_interval_s=0.5, location=Location(site="cellar")),
        "w2": SessionOptions(heartbeat_interval_s=0.5),
    }

    async def scenario() -> pb.StatusReply:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(
                run_connected(
                    WorkerState(worker_id),
                    SyntheticTrainer(PROBLEM, i),
                    f"127.0.0.1:{daemon.port}",
                    stop,
                    options,
                    Backoff(base_s=0.05, cap_s=0.5),
                )
            )
            for i, (worker_id, options) in enumerate(sites.items())
        ]
        while daemon.federation is None or daemon.federation.state.round <= 3:
            await asyncio.sleep(0.05)
        status = await _status(daemon.port)
        daemon.request_stop("test over")
        await asyncio.wait_for(master, 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        return status

    status = asyncio.run(scenario())
    assert status.weights_source == "llm" and status.llm_confidence == pytest.approx(0.9)
    assert dict(status.aggregation_weights) == pytest.approx({"w0": 1 / 6, "w1": 1 / 3, "w2": 0.5})
    assert "falling loss" in status.llm_reasoning
    domain = serde.status_reply_from_proto(status)
    assert domain.weights_source == "llm" and set(domain.aggregation_weights) == set(sites)
    facts = {w["worker_id"]: w for w in standin.requests[-1].workers}
    assert facts["w0"]["location"] == {"latitude": 52.5, "longitude": 13.4, "site": "roof"}
    assert facts["w0"]["features"] == {"cpu_load": 0.75, "traffic_mbps": 12.5}
    assert facts["w1"]["location"] == {"site": "cellar"} and "features" not in facts["w1"]
    assert all(len(f["recent_losses"]) >= 2 for f in facts.values())
    assert all(-1 <= f["update"]["cosine_with_aggregate"] <= 1 for f in facts.values())


@pytest.mark.slow
def test_demo_with_llm_weighting_reuses_the_answer_between_asks(
    standin: GeminiStandIn, tmp_path: Path
) -> None:
    base = tmp_path / "base.toml"
    base.write_text(
        "[model]\nlr = 0.05\nlocal_steps = 1\n[dataset]\nbatch_size = 16\n"
        "[lazy_selection]\nwarmup = 1\n[llm]\ncache_rounds = 3\ntimeout_s = 5.0\n"
    )
    out = tmp_path / "demo"
    env = child_env(GEMINI_API_KEY=API_KEY, **{BASE_URL_ENV: standin.base_url})
    args = ["demo", "--weighting", "llm", "--dataset", "synthetic", "--workers", "2"]
    args += ["--rounds", "6", "--no-lazy", "--config", str(base), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "flq.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_rounds(out / "rounds.csv")
    sources = [r["weights_source"] for r in rows]
    assert sources == ["llm", "cache", "cache", "llm", "cache", "cache"]
    assert len(standin.requests) == 2
    assert all(r["weights_used"] == "w0:0.3333;w1:0.6667" for r in rows)
    assert all(r["llm_reasoning"] == "w1 has more data and a falling loss" for r in rows)
    assert API_KEY not in (out / "master.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["flq_algorithm"]["weighting"] == "llm"
    advisor_summary = summary["weight_advisor"]  # the endpoint asked, not the config's ""
    assert advisor_summary["endpoint"] == standin.base_url
    assert advisor_summary["endpoint_from"] == f"${BASE_URL_ENV}"
    assert advisor_summary["rounds_by_source"] == {"cache": 4, "llm": 2}
    assert not math.isnan(float(rows[-1]["accuracy"]))

"""The weight advisors' pure parts: checking an answer, the prompt, the schema, the facts, the
update statistics and the agreement rule, the subset of a large fleet, and the master's step
with a decided set of weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flq.algorithm import ContributionStore, UpdateStats, agreement_weights, update_stats
from flq.algorithm.modes import parse_mode
from flq.codec import encode_float32
from flq.master.advice import (
    AgreementAdvisor,
    ContributorFacts,
    Evaluated,
    RunProgress,
    ServerSignals,
    facts_for,
    loss_trend,
)
from flq.master.llm import (
    AnswerRejected,
    Unlisted,
    blend,
    build_prompt,
    choose_listed,
    parse_answer,
    resolve_base_url,
    response_schema,
)
from flq.master.registry import WorkerRecord
from flq.master.results import compact_weights, one_line
from flq.master.state import AlgorithmSettings, MasterState, WeightDecision
from flq.types import DeviceInfo, Location

IDS = ["w0", "w1", "w2"]


def answer(weights: object, confidence: object = 0.9, reasoning: object = "ok") -> str:
    return json.dumps({"weights": weights, "confidence": confidence, "reasoning": reasoning})


def entries(**weights: float) -> list[dict[str, object]]:
    return [{"worker_id": w, "weight": x} for w, x in weights.items()]


def test_a_valid_answer_is_normalised_in_worker_order() -> None:
    proposal = parse_answer(answer(entries(w2=2.0, w0=1.0, w1=1.0)), IDS, 0.5)
    assert list(proposal.weights) == IDS
    assert proposal.weights == pytest.approx({"w0": 0.25, "w1": 0.25, "w2": 0.5})
    assert (proposal.confidence, proposal.reasoning) == (0.9, "ok")


def test_an_object_of_weights_is_accepted_too() -> None:
    proposal = parse_answer(answer({"w0": 1, "w1": 1, "w2": 2}), IDS, 0.0)
    assert proposal.weights["w2"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty_answer"),
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        (json.dumps({"confidence": 0.9}), "invalid_json"),
        (answer([{"worker_id": "w0"}]), "invalid_json"),
        (answer(entries(w0=1, w1=1) + entries(w0=1, w2=1)), "invalid_json"),
        (answer(entries(w0=1, w1=1)), "missing_workers"),
        (answer(entries(w0=1, w1=1, w2=1, w9=1)), "extra_workers"),
        (answer(entries(w0=1, w1=-0.5, w2=1)), "bad_weights"),
        (answer({"w0": 1, "w1": "heavy", "w2": 1}), "bad_weights"),
        (answer({"w0": 1, "w1": True, "w2": 1}), "bad_weights"),
        ('{"weights": {"w0": NaN, "w1": 1, "w2": 1}, "confidence": 0.9}', "bad_weights"),
        (answer(entries(w0=0, w1=0, w2=0)), "bad_weights"),
        (answer(entries(w0=1, w1=1, w2=1), confidence=1.5), "bad_confidence"),
        (answer(entries(w0=1, w1=1, w2=1), confidence="high"), "bad_confidence"),
        (answer(entries(w0=1, w1=1, w2=1), confidence=None), "bad_confidence"),
        (answer(entries(w0=1, w1=1, w2=1), confidence=0.49), "low_confidence"),
    ],
)
def test_unusable_answers_are_rejected_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(AnswerRejected) as rejected:
        parse_answer(text, IDS, 0.5)
    assert rejected.value.reason == reason
    assert rejected.value.detail


def test_loss_trend_reads_the_slope() -> None:
    assert loss_trend([2.0, 1.5, 1.0])["direction"] == "falling"
    assert loss_trend([2.0, 1.5, 1.0])["slope"] == pytest.approx(-0.5)
    assert loss_trend([1.0, 1.2, 1.5])["direction"] == "rising"
    assert loss_trend([1.0, 1.001, 0.999])["direction"] == "flat"
    assert loss_trend([1.0]) == {"slope": None, "direction": "unknown"}


def test_facts_come_from_the_registry_record() -> None:
    record = WorkerRecord("w3", 120, DeviceInfo(), Location(site="barn"), last_upload_round=4)
    record.recent_losses.extend([1.0, math.nan, 0.8])
    record.uplink_bits = 999
    record.features = {"traffic": 2.0}
    facts = facts_for("w3", record, round_id=7, fresh=False)
    assert (facts.num_samples, facts.staleness, facts.uplink_bits) == (120, 3, 999)
    assert facts.recent_losses == (1.0, 0.8)  # a non-finite loss says nothing
    assert facts.features == {"traffic": 2.0} and facts.location.site == "barn"
    unknown = facts_for("w9", None, round_id=7, fresh=False)
    assert (unknown.num_samples, unknown.staleness) == (0, None)
    never = facts_for("w3", WorkerRecord("w3", 1, DeviceInfo(), Location()), 7, False)
    assert never.staleness is None


def test_the_prompt_lists_each_worker_once_as_json() -> None:
    facts = [
        ContributorFacts("w0", 10, True, 0, 8, tuple(float(x) for x in range(9, 0, -1))),
        ContributorFacts("w1", 20, False, 3, 16, (), Location(1.5, 2.5), {"usage": 0.5}),
    ]
    prompt = build_prompt(12, facts)
    assert prompt.startswith("Round 12. 2 workers")
    listed = json.loads(prompt.partition("Workers (JSON):\n")[2])
    assert [w["worker_id"] for w in listed] == ["w0", "w1"]
    assert listed[0]["recent_losses"] == [5.0, 4.0, 3.0, 2.0, 1.0]  # the last five
    assert "location" not in listed[0] and "features" not in listed[0]
    assert listed[1]["location"] == {"latitude": 1.5, "longitude": 2.5}
    assert listed[1]["features"] == {"usage": 0.5}


def test_the_schema_names_exactly_the_workers_asked_about() -> None:
    schema = response_schema(IDS)
    item = schema["properties"]["weights"]["items"]
    assert item["properties"]["worker_id"]["enum"] == IDS
    assert set(schema["required"]) == {"weights", "reasoning", "confidence"}


def test_cells_for_results() -> None:
    assert compact_weights({"w1": 2 / 3, "w0": 1 / 3}) == "w0:0.3333;w1:0.6667"
    assert one_line("two\nlines  here") == "two lines here"
    assert len(one_line("x" * 1000)) == 240


def test_the_step_aggregates_with_a_decision_and_names_its_source() -> None:
    settings = AlgorithmSettings(mode="fedavg", server_optimizer="avg", weighting="llm")
    state = MasterState([np.zeros(2, np.float32)], settings)
    for worker_id, update in (("w0", [1.0, 0.0]), ("w1", [0.0, 1.0])):
        state.store.apply_upload(worker_id, [encode_float32(np.array(update, np.float32))])
    samples = {"w0": 100, "w1": 100}
    decided = WeightDecision({"w0": 3.0, "w1": 1.0, "w9": 5.0}, "llm", 0.8, "w0 is better")
    step = state.step(samples, fresh={"w0", "w1"}, decision=decided)
    assert step.source == "llm"
    assert step.weights == pytest.approx({"w0": 0.75, "w1": 0.25})  # w9 contributes nothing
    np.testing.assert_allclose(state.weights[0], [0.75, 0.25])
    plain = state.step(samples, fresh=set())  # no decision: the llm rule's fallback, samples
    assert plain.source == "samples" and plain.weights == pytest.approx({"w0": 0.5, "w1": 0.5})


# ---------------------------------------------------------------- update statistics


def fedavg_store(updates: dict[str, list[float]]) -> ContributionStore:
    store = ContributionStore([(2,)], parse_mode("fedavg"))
    for worker_id, update in updates.items():
        store.apply_upload(worker_id, [encode_float32(np.array(update, np.float32))])
    return store


def test_update_statistics_compare_each_update_with_the_aggregate_and_the_others() -> None:
    store = fedavg_store({"w0": [1.0, 0.0], "w1": [1.0, 0.2], "w2": [-3.0, 0.0]})
    stats = update_stats(store, {"w0": 1.0, "w1": 1.0, "w2": 2.0})
    # Aggregate with shares 1/4, 1/4, 1/2: (-1.0, 0.05); the others of w2: (1.0, 0.1).
    assert stats["w2"].norm == pytest.approx(3.0)
    assert stats["w2"].norm_ratio == pytest.approx(3.0 / math.hypot(1.0, 0.2))
    # w2 weighs half and pulls the aggregate its way: it "agrees" with it, not with the others.
    assert stats["w2"].cosine == pytest.approx(3.0 / (3.0 * math.hypot(-1.0, 0.05)))
    assert stats["w2"].cosine_others == pytest.approx(-1.0 / math.hypot(1.0, 0.1))
    others_of_w0 = np.array([-5.0, 0.2]) / 3  # (w1 + 2 w2) / 3
    expected = others_of_w0[0] / np.linalg.norm(others_of_w0)
    assert stats["w0"].cosine_others == pytest.approx(expected)
    assert stats["w0"].change is None  # a first upload moved nothing that was there


def test_the_change_since_the_last_upload_is_relative_to_what_was_stored() -> None:
    store = fedavg_store({"w0": [3.0, 4.0]})
    store.apply_upload("w0", [encode_float32(np.array([3.0, 0.0], np.float32))])
    assert store.change("w0") == pytest.approx(4.0 / 5.0)
    store.reset("w0")
    assert store.change("w0") is None
    assert update_stats(store, {"w0": 1.0}) == {}  # no contribution, no statistics


def test_the_agreement_rule_cuts_only_outliers_below_the_median() -> None:
    cosines = {"w0": 0.8, "w1": 0.7, "w2": 0.6, "w3": 0.75, "w4": 0.2, "w5": 0.65, "w6": -0.1}
    stats = {w: UpdateStats(1.0, 1.0, c, c, None) for w, c in cosines.items()}
    samples = {w: 10.0 for w in [*cosines, "w7"]}
    weights = agreement_weights(samples, stats)
    # median 0.65, MAD 0.1, spread 0.14826: w2 (z = 0.34) keeps its weight, w4 (z = 3.04)
    # loses half, w6 (z = 5.1) none; w7 has no statistics and keeps its samples.
    spread = 1.4826 * 0.1
    z4 = (0.65 - 0.2) / spread
    assert weights == pytest.approx(
        {
            "w0": 10,
            "w1": 10,
            "w2": 10,
            "w3": 10,
            "w4": 10 * (4 - z4) / 2,
            "w5": 10,
            "w6": 0,
            "w7": 10,
        }
    )
    no_common_direction = {w: UpdateStats(1.0, 1.0, -0.1, -0.1, None) for w in samples}
    assert agreement_weights(samples, no_common_direction) == samples


def test_the_agreement_advisor_names_whom_it_cut() -> None:
    import asyncio

    facts = [
        ContributorFacts("w0", 50, True, 0, 8, update=UpdateStats(1.0, 1.0, 0.9, 0.9, None)),
        ContributorFacts("w1", 50, True, 0, 8, update=UpdateStats(1.0, 1.0, 0.8, 0.8, None)),
        ContributorFacts("w2", 50, True, 0, 8, update=UpdateStats(1.0, 1.0, 0.85, 0.85, None)),
        ContributorFacts("w3", 50, True, 0, 8, update=UpdateStats(1.0, 1.0, -0.2, -0.2, None)),
    ]
    decision = asyncio.run(AgreementAdvisor().advise(4, facts, ServerSignals(4, 10)))
    assert decision.source == "agreement"
    assert decision.weights == pytest.approx({"w0": 50.0, "w1": 50.0, "w2": 50.0, "w3": 0.0})
    assert "w3 x0.00" in decision.reasoning


# ---------------------------------------------------------------- the prompt's new parts


def stats(cosine: float, ratio: float = 1.0) -> UpdateStats:
    return UpdateStats(2.0 * ratio, ratio, cosine, cosine, 0.25)


def test_the_prompt_carries_update_statistics_server_signals_and_feature_meanings() -> None:
    progress = RunProgress(max_rounds=40)
    progress.evaluated(5, 0.5, 1.4)
    progress.evaluated(10, 0.6, 1.2)
    progress.evaluated(15, math.nan, math.nan)  # not a measurement
    progress.trained(1.3)
    facts = [
        ContributorFacts("w0", 10, True, 0, 8, features={"traffic_mbps": 3.5}, update=stats(0.7)),
        ContributorFacts("w1", 20, True, 0, 8, features={"usage": 0.5}),
    ]
    prompt = build_prompt(
        16, facts, progress.signals(16), {"traffic_mbps": "uplink traffic, Mbit/s"}
    )
    server = json.loads(prompt.partition("Server (JSON): ")[2].partition("\n")[0])
    assert (server["rounds_done"], server["max_rounds"]) == (15, 40)
    assert server["global_test"] == [
        {"round": 5, "accuracy": 0.5, "loss": 1.4},
        {"round": 10, "accuracy": 0.6, "loss": 1.2},
    ]
    assert server["global_test_loss_trend"]["direction"] == "falling"
    meanings = json.loads(prompt.partition("Feature meanings (JSON): ")[2].partition("\n")[0])
    assert meanings == {"traffic_mbps": "uplink traffic, Mbit/s", "usage": "no description given"}
    w0, w1 = json.loads(prompt.partition("Workers (JSON):\n")[2])
    assert w0["update"] == {
        "norm": 2.0,
        "norm_ratio": 1.0,
        "cosine_with_aggregate": 0.7,
        "cosine_with_others": 0.7,
        "change_since_last_upload": 0.25,
    }
    assert "update" not in w1


def test_a_prompt_for_a_subset_says_who_is_not_listed() -> None:
    facts = [ContributorFacts("w0", 10, True, 0, 8)]
    prompt = build_prompt(3, facts, unlisted=Unlisted(4, 0.8))
    assert "5 workers contribute" in prompt and "4 not listed here" in prompt and "80.0%" in prompt


def test_the_listed_subset_is_half_anomalous_half_largest() -> None:
    facts = [ContributorFacts(f"w{i}", 100 + i, True, 0, 8, update=stats(0.9)) for i in range(8)]
    facts[1] = ContributorFacts("w1", 5, True, 0, 8, update=stats(-0.4))  # disagrees
    facts[2] = ContributorFacts("w2", 6, True, 0, 8, update=stats(0.9, ratio=20.0))  # huge
    listed = [c.worker_id for c in choose_listed(facts, 4)]
    assert listed == ["w1", "w2", "w6", "w7"]  # the two odd ones, then the two largest
    plain = [ContributorFacts(f"w{i}", 10 * i, True, 0, 8) for i in range(5)]
    assert [c.worker_id for c in choose_listed(plain, 2)] == ["w3", "w4"]  # no statistics


def test_blend_keeps_the_unlisted_sample_shares() -> None:
    facts = [ContributorFacts(w, n, True, 0, 8) for w, n in (("w0", 100), ("w1", 100), ("w2", 200))]
    weights = blend({"w0": 3.0, "w1": 1.0}, facts)
    assert weights == pytest.approx({"w0": 0.375, "w1": 0.125, "w2": 0.5})
    assert math.fsum(weights.values()) == pytest.approx(1.0)


def test_the_endpoint_asked_is_resolved_and_named() -> None:
    assert resolve_base_url("http://proxy:1", {"FLQ_LLM_BASE_URL": "x"}) == (
        "http://proxy:1",
        "config",
    )
    assert resolve_base_url("", {"GOOGLE_GEMINI_BASE_URL": "http://g:2"}) == (
        "http://g:2",
        "$GOOGLE_GEMINI_BASE_URL",
    )
    url, source = resolve_base_url("", {})
    assert url.startswith("https://generativelanguage.googleapis.com") and source == "default"


def test_server_signals_skip_what_is_not_a_number() -> None:
    progress = RunProgress(max_rounds=3)
    progress.trained(math.nan)
    progress.evaluated(1, math.inf, 1.0)
    assert progress.signals(2) == ServerSignals(2, 3, (), ())
    progress.evaluated(2, 0.5, 1.0)
    assert progress.signals(3).evaluations == (Evaluated(2, 0.5, 1.0),)


def test_the_demo_says_up_front_when_the_llm_key_is_missing() -> None:
    from flq.cli.progress import missing_key_warning
    from flq.config import default_config, with_overrides

    llm = with_overrides(default_config(), {"flq_algorithm.weighting": "llm"})
    assert missing_key_warning(llm, {}) == (
        "$GEMINI_API_KEY is not set: every round falls back to sample weights"
    )
    assert missing_key_warning(llm, {"GEMINI_API_KEY": "k"}) is None
    assert missing_key_warning(default_config(), {}) is None  # sample weights: no key needed

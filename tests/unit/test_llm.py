"""The LLM advisor's pure parts: checking an answer, the prompt, the schema, the facts, and the
master's step with a decided set of weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flq.codec import encode_float32
from flq.master.llm import (
    AnswerRejected,
    ContributorFacts,
    build_prompt,
    facts_for,
    loss_trend,
    parse_answer,
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

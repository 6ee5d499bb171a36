"""Logging: JSON lines off a terminal, the bound round on every line, stderr followed."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from flq.log import configure_logging


@pytest.fixture(autouse=True)
def _reset_structlog() -> object:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_lines_carry_the_bound_round() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)  # StringIO is not a terminal -> JSON
    structlog.contextvars.bind_contextvars(round=7)
    structlog.get_logger("t").info("round", accuracy=0.9)
    structlog.get_logger("t").debug("hidden")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "round" and lines[0]["round"] == 7 and lines[0]["level"] == "info"


def test_default_stream_follows_a_replaced_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("info", "json")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    structlog.get_logger("t").info("one")
    first.close()  # e.g. a test runner's capture ends
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("t").info("two")
    assert '"two"' in second.getvalue()


def test_an_unknown_level_is_named() -> None:
    with pytest.raises(ValueError, match="'loud'"):
        configure_logging("loud")

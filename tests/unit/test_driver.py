"""The round driver: stop rules, and the round id bound in the log context for a round only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from flq.config import default_config, with_overrides
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.driver import RoundDriver, StopRules, WorkersMissing
from flq.master.federation import build_federation


class _Evaluation:
    """A three-weight model whose evaluation scores `accuracies` in turn, then breaks."""

    parameters = 3

    def __init__(self, accuracies: list[float]) -> None:
        self.initial_weights = [np.zeros(3, np.float32)]
        self._accuracies = list(accuracies)

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        if not self._accuracies:
            raise RuntimeError("evaluation broke")
        return 1.0, self._accuracies.pop(0)


DriverFactory = Callable[..., RoundDriver]


@pytest.fixture
def make_driver(tmp_path: Path) -> Iterator[DriverFactory]:
    """Drivers over a worker-less federation; their results files are closed afterwards."""
    books: list[RoundBookkeeper] = []

    def make(accuracies: list[float], rules: StopRules, **hooks: Any) -> RoundDriver:
        cfg = with_overrides(
            default_config(), {"system.eval_every": 1, "system.max_rounds": rules.max_rounds}
        )
        federation = build_federation(cfg, _Evaluation(accuracies))
        books.append(RoundBookkeeper(federation, tmp_path / str(len(books)), checkpoints=False))
        return RoundDriver(federation.engine, books[-1], rules, **hooks)

    yield make
    for book in books:
        book.close()


def test_round_id_is_bound_during_a_round_and_unbound_when_it_raises(
    make_driver: DriverFactory,
) -> None:
    bound: list[object] = []
    driver = make_driver(
        [0.1],
        StopRules(max_rounds=5),
        on_start=lambda _: bound.append(structlog.contextvars.get_contextvars().get("round")),
    )

    async def run() -> dict[str, Any]:
        with pytest.raises(RuntimeError, match="evaluation broke"):
            await driver.run()
        return structlog.contextvars.get_contextvars()

    after = asyncio.run(run())
    assert bound == [1, 2]  # round 2's evaluation raised
    assert "round" not in after


def test_stops_at_max_rounds_or_at_the_target_accuracy(make_driver: DriverFactory) -> None:
    finished = make_driver([0.1, 0.2, 0.3], StopRules(max_rounds=3))
    asyncio.run(finished.run())
    assert finished.finished and finished.engine.state.round == 4

    target = make_driver([0.1, 0.6, 0.7], StopRules(max_rounds=3, target_accuracy=0.5))
    asyncio.run(target.run())
    assert not target.finished and target.engine.state.round == 3


def test_a_stop_request_ends_the_wait_for_workers(make_driver: DriverFactory) -> None:
    driver = make_driver([], StopRules(max_rounds=3, min_workers=2))  # waits as long as it takes

    async def run() -> None:
        asyncio.get_running_loop().call_later(0.2, driver.stop.set)
        await driver.run()

    asyncio.run(run())
    assert driver.engine.state.round == 1  # no round ran without workers


def test_the_wait_for_workers_gives_up_after_connect_timeout(make_driver: DriverFactory) -> None:
    driver = make_driver([], StopRules(max_rounds=3, min_workers=2, connect_timeout_s=0.1))
    with pytest.raises(WorkersMissing, match=r"gave up after 0.1 s .* 0 connected \(none\)"):
        asyncio.run(driver.run())
    assert driver.engine.state.round == 1

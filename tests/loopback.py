"""A real master daemon on a free loopback port, training the numpy synthetic problem.

Shared by the integration tests that need the gRPC path without TensorFlow's start-up cost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from flq.config import Config
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.federation import build_federation
from flq.synthetic import SyntheticEvaluation, SyntheticProblem


async def start_synthetic_master(
    cfg: Config, run_dir: Path, problem: SyntheticProblem, **options: Any
) -> tuple[MasterDaemon, asyncio.Task[None]]:
    """Start the daemon and return once it serves; the task ends when the run does.
    `options` are further MasterOptions (metrics port, ...)."""
    daemon = MasterDaemon(
        cfg,
        MasterOptions(
            port=0,
            run_dir=run_dir,
            federation_factory=lambda c: build_federation(c, SyntheticEvaluation(problem)),
            **options,
        ),
    )
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 30)
    return daemon, task

"""Options both daemons take, spelled once so `flq-master run` and `flq-worker run` agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flq.config import LogFormat, LogLevel

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Config file (.toml/.json).")]
LogLevelOpt = Annotated[LogLevel | None, typer.Option(help="Override logging.log_level.")]
LogFormatOpt = Annotated[LogFormat | None, typer.Option(help="Override logging.log_format.")]
MetricsPortOpt = Annotated[
    int,
    typer.Option(
        min=0, max=65535, envvar="FLQ_METRICS_PORT", help="Serve Prometheus /metrics; 0 = off."
    ),
]
MetricsHostOpt = Annotated[str, typer.Option(help="Address the metrics endpoint binds.")]

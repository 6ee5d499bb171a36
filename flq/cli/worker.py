"""`flq-worker`: run a worker daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from flq.cli.errors import handle_errors

app = typer.Typer(
    name="flq-worker", help="The FLQ worker daemon.", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """The FLQ worker: trains on local data and sends quantized updates to the master."""


@app.command()
@handle_errors
def run(
    master: Annotated[str, typer.Option(help="Master address, HOST:PORT.")],
    worker_id: Annotated[str, typer.Option("--worker-id", help="This worker's id, e.g. w3.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Config file (.toml/.json).")],
    partition_index: Annotated[
        int | None,
        typer.Option(
            help="Which data partition to load (default: the number at the end of the worker id).",
        ),
    ] = None,
    site: Annotated[str, typer.Option(help="Site label reported to the master.")] = "",
    latitude: Annotated[float | None, typer.Option(help="Latitude reported to the master.")] = None,
    longitude: Annotated[
        float | None, typer.Option(help="Longitude reported to the master.")
    ] = None,
    heartbeat: Annotated[
        float, typer.Option(help="Seconds between heartbeats while training.")
    ] = 5.0,
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"] | None,
        typer.Option(help="Override logging.log_level."),
    ] = None,
    log_format: Annotated[
        Literal["auto", "json", "console"] | None, typer.Option(help="Override logging.log_format.")
    ] = None,
) -> None:
    """Connect to the master (reconnecting with backoff) and train until told to stop."""
    from flq.cli.runtime import run_async, start
    from flq.config import ConfigError, load_config
    from flq.types import Location
    from flq.worker.daemon import WorkerDaemon, WorkerOptions

    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--master: got {master!r}, expected HOST:PORT (e.g. 10.0.0.5:50051)")
    cfg = load_config(config)
    start(cfg, log_level, log_format)
    location = Location(latitude=latitude, longitude=longitude, site=site)
    options = WorkerOptions(
        worker_id=worker_id,
        master=master,
        partition_index=partition_index,
        location=location,
        heartbeat_interval_s=heartbeat,
    )
    run_async(WorkerDaemon(cfg, options).run())


if __name__ == "__main__":
    app()

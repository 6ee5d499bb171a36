"""`flq-master`: run the master daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flq.blas import limit_blas_threads
from flq.cli.errors import handle_errors
from flq.cli.options import (
    ConfigOpt,
    LogFormatOpt,
    LogLevelOpt,
    MetricsHostOpt,
    MetricsPortOpt,
)

app = typer.Typer(
    name="flq-master", help="The FLQ master daemon.", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """The FLQ master: coordinates rounds, aggregates, checkpoints and records results."""
    limit_blas_threads()


@app.command()
@handle_errors
def run(
    config: ConfigOpt,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port to listen on (default: from system.master_url; 0 picks a free one)."
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: from system.master_url).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in the run directory.")
    ] = False,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Results and checkpoint directory (default: logging.result_dir)."),
    ] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    metrics_port: MetricsPortOpt = 0,
    metrics_host: MetricsHostOpt = "0.0.0.0",
) -> None:
    """Serve workers and run federated rounds until max_rounds, the target accuracy, or a stop."""
    from flq.cli.runtime import run_async, start
    from flq.config import load_config
    from flq.master.daemon import MasterDaemon, MasterOptions

    cfg = load_config(config)
    start(cfg, log_level, log_format)
    options = MasterOptions(
        host=host,
        port=port,
        resume=resume,
        run_dir=run_dir,
        metrics_port=metrics_port or None,
        metrics_host=metrics_host,
    )
    daemon = MasterDaemon(cfg, options)
    run_async(daemon.run())
    if daemon.forced:
        raise typer.Exit(130)  # stopped by a second signal: the round in flight was abandoned


if __name__ == "__main__":
    app()

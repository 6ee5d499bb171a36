"""`flq-worker`: run a worker daemon."""

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
    name="flq-worker", help="The FLQ worker daemon.", no_args_is_help=True, add_completion=False
)


@app.callback()
def main() -> None:
    """The FLQ worker: trains on local data and sends quantized updates to the master."""
    limit_blas_threads()


@app.command()
@handle_errors
def run(
    master: Annotated[str, typer.Option(help="Master address, HOST:PORT.")],
    worker_id: Annotated[str, typer.Option("--worker-id", help="This worker's id, e.g. w3.")],
    config: ConfigOpt,
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
    feature: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=NUMBER the master's LLM weighting sees (traffic, usage); repeatable.",
        ),
    ] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(envvar="FLQ_TLS_CA", help="CA certificate (PEM) of the master: TLS on."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(envvar="FLQ_TLS_CERT", help="This worker's certificate (PEM), mutual TLS."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="FLQ_TLS_KEY", help="This worker's private key (PEM), mutual TLS."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="FLQ_WORKER_TOKEN_FILE",
            help="File holding this worker's token (else $FLQ_WORKER_TOKEN).",
        ),
    ] = None,
    metrics_port: MetricsPortOpt = 0,
    metrics_host: MetricsHostOpt = "0.0.0.0",
) -> None:
    """Connect to the master (reconnecting with backoff) and train until told to stop."""
    from flq.cli.runtime import exit_now_if_training, run_async, start
    from flq.config import ConfigError, load_config
    from flq.security import WORKER_TOKEN_ENV, client_token, load_client_tls
    from flq.serde import WireError, identifier
    from flq.types import Location
    from flq.worker.daemon import WorkerDaemon, WorkerOptions

    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--master: got {master!r}, expected HOST:PORT (e.g. 10.0.0.5:50051)")
    try:
        identifier(worker_id, "--worker-id")  # the master would refuse it at every connect
    except WireError as error:
        raise ConfigError(str(error)) from None
    cfg = load_config(config)
    start(cfg, log_level, log_format)
    location = Location(latitude=latitude, longitude=longitude, site=site)
    options = WorkerOptions(
        worker_id=worker_id,
        master=master,
        partition_index=partition_index,
        location=location,
        heartbeat_interval_s=heartbeat,
        features=parse_features(feature or []),
        tls=load_client_tls(tls_ca, tls_cert, tls_key),
        token=client_token(token_file, WORKER_TOKEN_ENV),
        metrics_port=metrics_port or None,
        metrics_host=metrics_host,
    )
    run_async(WorkerDaemon(cfg, options).run())
    exit_now_if_training()  # SIGTERM mid-epoch: exit now, not when the epoch ends


def parse_features(values: list[str]) -> dict[str, float]:
    """--feature NAME=NUMBER values as a map; a ConfigError names a malformed one."""
    import math

    from flq.config import ConfigError

    features: dict[str, float] = {}
    for value in values:
        name, eq, number = value.partition("=")
        try:
            parsed = float(number)
        except ValueError:
            parsed = math.nan
        if not (name.strip() and eq and math.isfinite(parsed)):
            raise ConfigError(f"--feature: got {value!r}, expected NAME=NUMBER (e.g. traffic=3.5)")
        features[name.strip()] = parsed
    return features


if __name__ == "__main__":
    app()

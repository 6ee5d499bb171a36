"""`flq status`, `flq stop`, `flq model pull`, `flq health`: the master's admin RPCs (and its
health service) from a shell, a script or a container probe.

Every command takes the master's address, the TLS files it needs (`--tls-ca`; `--tls-cert` and
`--tls-key` when the master wants client certificates) and the admin token (`--admin-token-file`
or the FLQ_ADMIN_TOKEN variable). Errors say which master they were talking to and exit with the
codes in flq/cli/errors.py: 4 when the master cannot be reached, 5 when it refuses the token or
certificate.

`flq model pull` always writes .npz (an FLQ checkpoint file: `weights/0..n`, plus the round and
the model description). For .keras it rebuilds the architecture from what the master reports in
its Status (model name, input shape, classes, hidden units — the master's own config), so no
config file is needed on the admin's machine; that needs TensorFlow installed there.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flq.admin import (
    ADMIN_TOKEN_ENV,
    AdminClient,
    AdminError,
    AdminTarget,
    MasterUnreachable,
    run_admin,
)
from flq.cli.errors import handle_errors

if TYPE_CHECKING:
    import numpy as np

    from flq.types import StatusReply

MODEL_SUFFIXES = (".npz", ".keras")

# ---------------------------------------------------------------- options every command shares

MasterOpt = Annotated[
    str, typer.Option("--master", envvar="FLQ_MASTER", help="The master's HOST:PORT.")
]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", envvar="FLQ_TLS_CA", help="CA certificate (PEM) to verify the master (TLS)."
    ),
]
TlsCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert", envvar="FLQ_TLS_CERT", help="Client certificate (PEM), for mutual TLS."
    ),
]
TlsKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-key", envvar="FLQ_TLS_KEY", help="Client private key (PEM), for mutual TLS."
    ),
]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--admin-token-file",
        envvar="FLQ_ADMIN_TOKEN_FILE",
        help=f"File holding the admin token (else ${ADMIN_TOKEN_ENV}).",
    ),
]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the master.")]


def _target(
    master: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    token_file: Path | None,
    timeout: float,
) -> AdminTarget:
    from flq.config import ConfigError
    from flq.security import client_token, load_client_tls

    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--master: got {master!r}, expected HOST:PORT (e.g. 10.0.0.5:50051)")
    return AdminTarget(
        address=master,
        tls=load_client_tls(tls_ca, tls_cert, tls_key),
        token=client_token(token_file, ADMIN_TOKEN_ENV),
        timeout_s=timeout,
    )


# ---------------------------------------------------------------- status


def ago(seconds_since: float) -> str:
    """'3s ago', '5m ago', '2h ago', '4d ago'."""
    seconds = max(0.0, seconds_since)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def bits_text(bits: float) -> str:
    """Bits with an SI prefix: '950 bit', '12.3 kbit', '1.20 Mbit'."""
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bits >= size:
            return f"{bits / size:.3g} {prefix}bit"
    return f"{int(bits)} bit"


def _number(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def status_as_dict(status: StatusReply, now: float) -> dict[str, Any]:
    """Status as plain JSON (NaN becomes null; last_seen_s is seconds since, null if never)."""

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    data = {key: clean(value) for key, value in asdict(status).items() if key != "workers"}
    data["model"]["input_shape"] = list(status.model.input_shape)
    data["workers"] = [
        {
            **asdict(w),
            "last_seen_s": None if w.last_seen_unix <= 0 else round(now - w.last_seen_unix, 3),
        }
        for w in status.workers
    ]
    return data


def _weight(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_status(status: StatusReply, address: str, now: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    connected = sum(w.connected for w in status.workers)
    console.print(
        f"[bold]master[/] {address}   state [bold]{status.state}[/]   mode {status.mode}   "
        f"round {status.round}/{status.max_rounds}"
    )
    console.print(
        f"accuracy {_number(status.accuracy)}   loss {_number(status.loss)}   "
        f"model {status.model.name or '?'} on {status.model.dataset or '?'} "
        f"({status.model.parameters:,} parameters)"
    )
    budget = status.up_budget_bits
    used = status.last_round_uplink_bits
    share = f" of {bits_text(budget)} budget ({100 * used / budget:.0f}%)" if budget else ""
    console.print(
        f"uplink last round {bits_text(used)}{share}, total {bits_text(status.total_uplink_bits)}"
        f"   downlink total {bits_text(status.total_downlink_bits)}"
    )
    if status.weights_source:
        confidence = (
            ""
            if math.isnan(status.llm_confidence)
            else (f"   confidence {status.llm_confidence:.2f}")
        )
        reasoning = f"   ({status.llm_reasoning})" if status.llm_reasoning else ""
        console.print(f"weights from {status.weights_source}{confidence}{reasoning}")
    table = Table(title=f"workers: {connected} connected of {len(status.workers)}")
    for column in ("worker", "connected", "last seen", "samples", "uplink", "uploads", "skips"):
        table.add_column(column, justify="left" if column == "worker" else "right")
    table.add_column("failures", justify="right")
    table.add_column("weight", justify="right")
    for w in status.workers:
        table.add_row(
            w.worker_id,
            "yes" if w.connected else "no",
            "never" if w.last_seen_unix <= 0 else ago(now - w.last_seen_unix),
            str(w.num_samples),
            bits_text(w.uplink_bits),
            str(w.uploads),
            str(w.skips),
            str(w.failures),
            _weight(status.aggregation_weights.get(w.worker_id)),
        )
    console.print(table)


@handle_errors
def status(
    master: MasterOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    admin_token_file: TokenFileOpt = None,
    timeout: TimeoutOpt = 10.0,
) -> None:
    """Show the master's round, accuracy, budget use and every worker it knows."""
    target = _target(master, tls_ca, tls_cert, tls_key, admin_token_file, timeout)
    reply = run_admin(target, lambda client: client.status())
    now = time.time()
    if as_json:
        typer.echo(json.dumps(status_as_dict(reply, now), indent=2))
    else:
        render_status(reply, master, now)


# ---------------------------------------------------------------- stop


async def _stop_and_wait(
    client: AdminClient, reason: str, wait: bool, wait_s: float
) -> tuple[int, bool]:
    _, round_id = await client.stop(reason)
    if not wait:
        return round_id, False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        try:
            await client.status()
        except MasterUnreachable:
            return round_id, True
        await asyncio.sleep(0.25)
    return round_id, False


@handle_errors
def stop(
    master: MasterOpt,
    reason: Annotated[str, typer.Option(help="Why; goes into the master's log.")] = "flq stop",
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the master has exited.")
    ] = False,
    wait_timeout: Annotated[float, typer.Option(min=1, help="Seconds --wait waits.")] = 300.0,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    admin_token_file: TokenFileOpt = None,
    timeout: TimeoutOpt = 10.0,
) -> None:
    """Stop the master gracefully: it ends the round, writes checkpoint and results, exits 0."""
    target = _target(master, tls_ca, tls_cert, tls_key, admin_token_file, timeout)
    round_id, gone = run_admin(
        target, lambda client: _stop_and_wait(client, reason, wait, wait_timeout)
    )
    typer.echo(f"stop requested from the master at {master} (last completed round {round_id})")
    if wait and not gone:
        raise AdminError(f"the master at {master} still answers after {wait_timeout:g}s")
    if gone:
        typer.echo("the master has stopped")


# ---------------------------------------------------------------- health


@handle_errors
def health(
    master: MasterOpt,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Ask the master's gRPC health service: exit 0 if it serves, 1 if not (a probe for
    containers; kubelet's own gRPC probe speaks no TLS). Needs no admin token."""
    from flq.security import channel_credentials, load_client_tls
    from flq.worker.connection import master_serving

    tls = load_client_tls(tls_ca, tls_cert, tls_key)
    credentials = None if tls is None else channel_credentials(tls)
    if asyncio.run(master_serving(master, credentials, timeout)):
        typer.echo(f"the master at {master} is serving")
        return
    typer.echo(f"the master at {master} is not serving (unreachable, starting or stopping)")
    raise typer.Exit(1)


# ---------------------------------------------------------------- model pull


model_app = typer.Typer(help="The global model.", no_args_is_help=True)


async def _pull(client: AdminClient) -> tuple[StatusReply, int, list[np.ndarray]]:
    status_reply = await client.status()
    round_id, weights = await client.model()
    return status_reply, round_id, weights


def write_npz(path: Path, status_reply: StatusReply, round_id: int, weights: list[Any]) -> None:
    from flq.master.checkpoint import write_model_npz

    write_model_npz(path, list(weights), status_reply.model, status_reply.mode, round_id)


def write_keras(path: Path, status_reply: StatusReply, weights: list[Any]) -> None:
    import importlib.util

    info = status_reply.model
    if not info.input_shape or info.num_classes < 2:
        raise AdminError(
            f"the master's model ({info.name} on {info.dataset!r}) has no keras form; "
            "write .npz instead"
        )
    if importlib.util.find_spec("tensorflow") is None:
        raise AdminError(
            "writing .keras needs TensorFlow here (pip install 'flq[worker]'); .npz needs nothing"
        )
    from flq.learning.models import ModelRecipe
    from flq.learning.trainer import as_model_weights
    from flq.learning.weights import write_keras as save_keras

    # A user's model (model.builder) is rebuilt here from the same spec: run where it resolves.
    builder = info.name if ":" in info.name else ""
    recipe = ModelRecipe(name=info.name, builder=builder, hidden_units=info.hidden_units)
    model = recipe.build(tuple(info.input_shape), info.num_classes)
    try:
        checked = as_model_weights(model, weights)
    except ValueError as error:
        raise AdminError(f"the master's weights do not fit {info.name}: {error}") from None
    save_keras(model, checked, path)


@model_app.command("pull")
@handle_errors
def model_pull(
    master: MasterOpt,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="File to write: .npz, or .keras (TensorFlow).")
    ],
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    admin_token_file: TokenFileOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Download the global model from the master and write it as .npz or .keras."""
    suffix = output.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise typer.BadParameter(
            f"{output}: write {' or '.join(MODEL_SUFFIXES)}", param_hint="--output"
        )
    target = _target(master, tls_ca, tls_cert, tls_key, admin_token_file, timeout)
    status_reply, round_id, weights = run_admin(target, _pull)
    if suffix == ".keras":
        write_keras(output, status_reply, weights)
    else:
        write_npz(output, status_reply, round_id, weights)
    parameters = sum(int(w.size) for w in weights)
    typer.echo(f"wrote {output} (round {round_id}, {len(weights)} tensors, {parameters:,} values)")

"""`flq certs init DIR --master-host H --workers w0,w1` and `flq certs add-worker DIR w7`:
the commands over flq/certs.py, which says what each file is for."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flq.certs import add_workers, init_directory
from flq.cli.errors import handle_errors

app = typer.Typer(help="Certificates and tokens for TLS and authentication.", no_args_is_help=True)


def _split_ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("init")
@handle_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Directory to create the files in.")],
    master_host: Annotated[
        str, typer.Option("--master-host", help="Name or address workers use for the master.")
    ],
    workers: Annotated[str, typer.Option(help="Comma-separated worker ids, e.g. w0,w1,w2.")] = "",
) -> None:
    """Create a CA, the master's certificate, worker and admin certificates, and all tokens."""
    written = init_directory(directory, master_host, _split_ids(workers))
    typer.echo(f"wrote {len(written)} files to {directory} (mode 0600):")
    for path in written:
        typer.echo(f"  {path.name}")
    typer.echo(
        f"master: add {directory / 'security.toml'} to its config and load master.env into its "
        "environment; worker w: --tls-ca ca.pem --tls-cert w.pem --tls-key w.key "
        "--token-file w.token; admin: --tls-ca ca.pem --tls-cert admin.pem --tls-key admin.key "
        "--admin-token-file admin.token"
    )


@app.command("add-worker")
@handle_errors
def add_worker(
    directory: Annotated[Path, typer.Argument(help="Directory `flq certs init` wrote.")],
    worker_ids: Annotated[list[str], typer.Argument(help="Worker ids to issue.")],
) -> None:
    """Issue certificates and tokens for more workers with the existing CA (restart the master
    afterwards: it reads tokens.txt at start-up)."""
    written = add_workers(directory, worker_ids)
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {directory}; restart the master")

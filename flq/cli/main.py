"""`flq`: the user's tool — config checks, demo, simulation, reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from flq import __version__
from flq.cli import admin, certs
from flq.cli.errors import handle_errors

app = typer.Typer(
    name="flq",
    help="FLQ: federated learning with quantized, lazily aggregated updates for edge boards.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Check and show FLQ config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
# Admin RPCs (flq/cli/admin.py) and deployment secrets (flq/cli/certs.py over flq/certs.py).
app.command("status")(admin.status)
app.command("stop")(admin.stop)
app.command("health")(admin.health)
app.add_typer(admin.model_app, name="model")
app.add_typer(certs.app, name="certs")

ConfigFile = Annotated[
    Path, typer.Argument(help="Config file (.toml or .json), sectioned like the original FLQ.")
]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """FLQ: federated learning with quantized, lazily aggregated updates for edge boards."""
    from flq.log import configure_logging, quiet_third_party_env

    quiet_third_party_env()
    configure_logging("info" if verbose else "warning")


@app.command()
def version() -> None:
    """Print FLQ's version."""
    typer.echo(__version__)


@config_app.command("check")
@handle_errors
def config_check(path: ConfigFile) -> None:
    """Validate a config file; exit 2 with a message naming the bad key if it is wrong."""
    from flq.config import config_warnings, load_config

    cfg = load_config(path)
    typer.echo(
        f"{path}: ok (mode={cfg.flq_algorithm.mode}, workers={cfg.system.total_workers}, "
        f"rounds={cfg.system.max_rounds}, dataset={cfg.dataset.label})"
    )
    for warning in config_warnings(cfg):
        typer.echo(f"{path}: warning: {warning}", err=True)


@config_app.command("show")
@handle_errors
def config_show(
    path: Annotated[Path | None, typer.Argument(help="Config file; omit for the defaults.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Print the resolved config: the file's values with every default filled in."""
    from flq.config import config_to_dict, dumps_toml, load_config

    cfg = load_config(path)
    typer.echo(json.dumps(config_to_dict(cfg), indent=2) if as_json else dumps_toml(cfg))


Mode = Literal["fedavg", "laq8", "bbit", "bin", "stc", "sti"]  # as flq.config.Mode
Dataset = Literal["digits", "fashion-mnist", "mnist", "npz", "synthetic"]
ModelName = Literal["logreg", "mlp", "cnn"]
Weighting = Literal["samples", "uniform", "llm", "agreement"]
FusionMethod = Literal["none", "distill", "param_attention"]  # as flq.config.FusionMethod


@app.command()
@handle_errors
def demo(
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes to start.")] = 4,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to run.")] = 30,
    mode: Annotated[Mode, typer.Option(help="Upload mode.")] = "bbit",
    dataset: Annotated[Dataset, typer.Option(help="Dataset.")] = "digits",
    model: Annotated[ModelName, typer.Option(help="Model.")] = "mlp",
    b_up: Annotated[int, typer.Option(min=1, max=16, help="Uplink bits (bbit).")] = 4,
    b_down: Annotated[int, typer.Option(min=1, max=32, help="Downlink bits (32 = float32).")] = 8,
    lazy: Annotated[bool, typer.Option("--lazy/--no-lazy", help="Lazy uploads (LAQ rule).")] = True,
    thr_scale: Annotated[float, typer.Option(min=0.0, help="Lazy threshold scale.")] = 0.5,
    budget: Annotated[
        float, typer.Option(min=0.0, help="Uplink bit budget per round (0 = none).")
    ] = 0.0,
    weighting: Annotated[
        Weighting,
        typer.Option(
            help="Aggregation weights (llm: needs $GEMINI_API_KEY, see [llm] config; agreement: "
            "down-weight updates that disagree with the rest)."
        ),
    ] = "samples",
    lora_rank: Annotated[
        int, typer.Option(min=0, help="LoRA-only federation with this adapter rank (0 = off).")
    ] = 0,
    fusion: Annotated[
        FusionMethod | None,
        typer.Option(
            help="Knowledge fusion on the master (default: the base config's); without a "
            "fusion.teacher file, a teacher is trained on the master's held-out share first."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Base config file; options above override it.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: results/demo-<time>).")
    ] = None,
) -> None:
    """Run a real federation on 127.0.0.1: a master and N worker processes over gRPC."""
    from flq.cli.progress import run_demo_with_progress
    from flq.demo import DemoOptions

    options = DemoOptions(
        workers=workers,
        rounds=rounds,
        mode=mode,
        dataset=dataset,
        model=model,
        b_up=b_up,
        b_down=b_down,
        lazy=lazy,
        thr_scale=thr_scale,
        budget_bits=budget,
        weighting=weighting,
        lora_rank=lora_rank,
        fusion=fusion,
        out=out,
        base_config=config,
    )
    run_demo_with_progress(options)


@app.command()
@handle_errors
def simulate(
    config: Annotated[Path, typer.Option("--config", "-c", help="Config file (.toml/.json).")],
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: logging.result_dir).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Override system.max_rounds.")] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="auto|HOST:PORT",
            help="Run the workers as actors on a Ray cluster (auto: the one `ray start` began "
            "here, or $RAY_ADDRESS); reservations from the [ray] config. Needs flq[ray].",
        ),
    ] = None,
) -> None:
    """Run the same round engine with in-memory workers in one process (sweeps, benchmarks),
    or with the workers spread over a Ray cluster (--ray)."""
    from flq.cli.progress import run_simulation_with_progress
    from flq.config import load_config, with_overrides

    if ray is not None:
        from flq.raysim import check_address  # the form only: Ray is imported when it runs

        check_address(ray)
    cfg = load_config(config)
    if rounds is not None:
        cfg = with_overrides(cfg, {"system.max_rounds": rounds})
    run_simulation_with_progress(cfg, out or Path(cfg.logging.result_dir), ray_address=ray)


@app.command()
@handle_errors
def report(
    results: Annotated[list[Path], typer.Argument(help="Run directories or rounds.csv files.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Image to write.")] = Path(
        "plot.png"
    ),
    title: Annotated[str, typer.Option(help="Figure title.")] = "",
) -> None:
    """Draw accuracy against round and against cumulative uplink bits, one line per run."""
    from flq.report import load_curve, plot_curves

    curves = []
    for path in results:
        try:
            curves.append(load_curve(path))
        except FileNotFoundError as error:
            raise typer.BadParameter(str(error)) from error
    typer.echo(f"wrote {plot_curves(curves, output, title)}")


if __name__ == "__main__":
    app()

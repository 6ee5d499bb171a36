"""LoRA that learns: adapters federated on a pretrained base vs full-model federation (issue 13).

    python -m bench.bench_lora prepare   # the server's public part, the workers' rest, the base
    python -m bench.bench_lora run       # every bench/configs/lora-digits-*.toml (or name some)
    python -m bench.bench_lora table     # accuracy and bytes per upload, from rounds.csv

The setting, small enough for two shared cores: the CNN (FLQ's Fashion-MNIST model, here on
scikit-learn's 8x8 digits: 99,178 parameters) and digits' training split (1,347 images; the test
split's 450 score every run). The server holds a public 10 % of the training split (stratified,
135 images) and pretrains the CNN on it centrally (`prepare`: Adam, written as
build/lora/digits-base.keras); the workers hold the other 90 % (build/lora/digits-rest.npz),
Dirichlet-split over 10 workers. Then, through `flq simulate`'s engine, the same federation runs
as:
- LoRA rank 4 and 8 on the pretrained base (`lora.base`): only the adapters travel;
- LoRA rank 8 on the random base (no `lora.base`): the case issue 13 found stuck at chance;
- the full model from the pretrained base, and from a random start (plain federated learning).
The configs name their data and base by relative path: run from the repository root. The full
model "from the base" starts the master from the base's weights in-process (`initial = "base"`
in this file's RUNS), since `flq simulate` has no key for a full model's initial weights yet.

`table` measures bytes per upload from each run's rounds.csv (uplink bits / uploads, in rounds
where the master's screen refused none), not from a parameter ratio, and prints the markdown
table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_accuracy import machine
from flq.config import Config, dumps_toml, load_config
from flq.master.results import read_rounds

CONFIGS = Path(__file__).parent / "configs"
RESULTS = Path("docs/results")
WORK = Path("build/lora")
BASE = WORK / "digits-base.keras"
REST = WORK / "digits-rest.npz"
PUBLIC_FRACTION = 0.10
SEED = 42  # the configs' system.seed: the same train/test split of digits
PRETRAIN = {"epochs": 60, "batch_size": 16, "lr": 2e-3}
# Run name -> (config, the full model's initial weights: "base", or "" for the config's own).
RUNS = {
    "lora-digits-r4": ("lora-digits-r4", ""),
    "lora-digits-r8": ("lora-digits-r8", ""),
    "lora-digits-r8-random": ("lora-digits-r8-random", ""),
    "lora-digits-full-base": ("lora-digits-full", "base"),
    "lora-digits-full-random": ("lora-digits-full", ""),
}


def prepare() -> dict[str, Any]:
    """Split digits' training part into the public 10 % and the rest; pretrain the base."""
    from flq.learning.data import load_dataset, stratified_test_mask
    from flq.learning.models import build_model
    from flq.learning.tfimport import keras

    spec, train, test = load_dataset("digits", seed=SEED)
    public = stratified_test_mask(train.y, PUBLIC_FRACTION, SEED)
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(REST, x_train=train.x[~public], y_train=train.y[~public], x_test=test.x, y_test=test.y)
    model = build_model("cnn", spec.input_shape, spec.num_classes, seed=SEED)
    model.compile(
        optimizer=keras().optimizers.Adam(PRETRAIN["lr"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    began = time.perf_counter()
    model.fit(
        train.x[public],
        train.y[public],
        epochs=PRETRAIN["epochs"],
        batch_size=PRETRAIN["batch_size"],
        verbose=0,
    )
    from flq.learning.weights import write_keras

    write_keras(model, model.get_weights(), BASE)
    _, accuracy = model.evaluate(test.x, test.y, verbose=0)
    facts = {
        "public_samples": int(public.sum()),
        "rest_samples": int((~public).sum()),
        "test_samples": len(test),
        "parameters": int(model.count_params()),
        "base_test_accuracy": round(float(accuracy), 4),
        "pretrain": PRETRAIN,
        "pretrain_s": round(time.perf_counter() - began, 1),
        "machine": machine(),
    }
    out = RESULTS / "lora-digits-base.json"
    out.write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts), flush=True)
    return facts


def run(name: str) -> Path:
    from flq.log import configure_logging
    from flq.master.federation import Evaluation, build_federation
    from flq.sim import simulate

    config_name, initial = RUNS[name]
    path = CONFIGS / f"{config_name}.toml"
    cfg: Config = load_config(path)
    run_dir = RESULTS / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(f"# {path.name}, initial: {initial or 'config'}\n")
    with (run_dir / "config.toml").open("a") as out:
        out.write(dumps_toml(cfg))
    configure_logging("warning", "json")
    federation = None
    if initial == "base":
        evaluation = Evaluation(cfg)
        evaluation.initial_weights = base_weights(evaluation)
        federation = build_federation(cfg, evaluation)
    began = time.perf_counter()

    def progress(row: dict[str, Any]) -> None:
        if row["accuracy"] != "nan" and int(row["round"]) % cfg.system.eval_every == 0:
            print(f"{name} round {row['round']} acc {row['accuracy']}", flush=True)

    result = simulate(cfg, run_dir, on_round=progress, federation=federation)
    (run_dir / "rounds.xlsx").unlink(missing_ok=True)  # keep docs/results small: csv only
    for model_file in ("model.keras", "model.npz"):  # the run's product; not for the repository
        (run_dir / model_file).unlink(missing_ok=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary |= {"run": name, "initial": initial, "wall_s": round(time.perf_counter() - began, 1)}
    summary["machine"] = machine()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{name}: accuracy {result.accuracy:.4f} after {result.rounds} rounds", flush=True)
    return run_dir


def base_weights(evaluation: Any) -> list[np.ndarray]:
    from flq.learning.models import build_model
    from flq.learning.weights import load_weights_file

    spec = evaluation.spec
    model = build_model("cnn", spec.input_shape, spec.num_classes)
    load_weights_file(model, BASE)
    return [np.asarray(w, np.float32) for w in model.get_weights()]


def stats(name: str) -> dict[str, Any]:
    run_dir = RESULTS / name
    rows = read_rounds(run_dir / "rounds.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    scored = [(int(r["round"]), float(r["accuracy"])) for r in rows if r["accuracy"] != "nan"]
    uplink_bits = sum(int(r["uplink_bits"]) for r in rows)
    # Per upload from the rounds where every upload counted: an upload the master's screen
    # refused (a `failed` worker) crossed the wire and is in uplink_bits, not in `selected`.
    clean = [r for r in rows if int(r["failed"]) == 0 and int(r["selected"]) > 0]
    per_upload = statistics.median(int(r["uplink_bits"]) / 8 / int(r["selected"]) for r in clean)
    return {
        "run": name,
        "rounds": len(rows),
        "first": scored[0][1],
        "final": scored[-1][1],
        "best": max(a for _, a in scored),
        "exchanged": summary["exchanged_parameters"],
        "served": summary["total_parameters"],
        "bytes_per_upload": per_upload,
        "uplink_bits": uplink_bits,
        "median_round_s": statistics.median(float(r["seconds"]) for r in rows),
        "wall_s": summary.get("wall_s"),
    }


def table(names: list[str]) -> str:
    base = json.loads((RESULTS / "lora-digits-base.json").read_text())
    lines = [
        f"Pretrained base alone (server's {base['public_samples']} images): test accuracy "
        f"{base['base_test_accuracy']:.3f}.",
        "",
        "| run | parameters sent / served | accuracy, round 2 | final (round 60) | best "
        "| bytes per upload (measured) | uplink total |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = stats(name)
        lines.append(
            f"| {name} | {s['exchanged']:,} / {s['served']:,} | {s['first']:.3f} | "
            f"{s['final']:.3f} | {s['best']:.3f} | {s['bytes_per_upload']:,.0f} | "
            f"{s['uplink_bits'] / 8e6:.2f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["prepare", "run", "table"])
    parser.add_argument("runs", nargs="*", help=f"run names (default: all of {list(RUNS)})")
    args = parser.parse_args(argv)
    names = args.runs or list(RUNS)
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; expected some of {list(RUNS)}")
    if args.command == "prepare":
        prepare()
    elif args.command == "run":
        for name in names:
            run(name)
    else:
        print(table(names))


if __name__ == "__main__":
    main()

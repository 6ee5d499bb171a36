"""The fault soak as a benchmark: a longer run of tests/soak with its counts.

    python -m bench.bench_soak --duration 600 --seed 1 --json docs/results/soak.json

Real flq-master and flq-worker processes on 127.0.0.1 (the numpy synthetic problem), a seeded
injector (SIGKILL/SIGSTOP of workers, SIGKILL + --resume of the master, raw clients that go
silent, flood, upload huge values or the wrong codec, send garbage), invariants after every round.
Exit status 1 when an invariant broke.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from tests.soak.fleet import FleetSettings
from tests.soak.injector import FAULT_CLASSES, SoakSettings, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="injection seconds")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this round (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--faults", default=",".join(FAULT_CLASSES), help="comma-separated fault classes"
    )
    fleet = FleetSettings()
    parser.add_argument("--workers", type=int, default=fleet.workers)
    parser.add_argument("--round-timeout", type=float, default=fleet.round_timeout_s)
    parser.add_argument("--dir", type=Path, default=None, help="keep logs and results here")
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = parser.parse_args(argv)
    settings = SoakSettings(
        seed=args.seed,
        duration_s=args.duration,
        max_rounds=args.rounds,
        faults=tuple(f for f in args.faults.split(",") if f),
        fleet=FleetSettings(workers=args.workers, round_timeout_s=args.round_timeout),
    )
    with tempfile.TemporaryDirectory(prefix="flq-soak-") as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        report = run_soak(directory, settings)
    print(report.summary())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "settings": asdict(settings),
            **{k: v for k, v in asdict(report).items() if k not in ("settings",)},
        }
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())

"""The deployment inventory (inventory.toml) read into per-host targets for deploy_jetson.sh.

`read_inventory` checks the file (unknown keys, bad hosts and worker ids, missing files, hosts
whose entries disagree) and reports every problem at once; `shell_assignments` prints the plan as
bash array assignments, shell-quoted, that the script `eval`s: T_* per target host (master
first), W_* per worker, M_* for the master. Standard library only: the script runs this file
with the operator's Python before any wheel exists (`python -m flq.inventory INVENTORY`).
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

# May sit in [defaults], [master] or a [[workers]] entry; one value per host.
HOST_KEYS: dict[str, Any] = {
    "ssh_user": "",
    "ssh_port": 22,
    "ssh_key": "",
    "known_hosts": "",
    "sudo": None,  # default: sudo unless ssh_user is root
    "prefix": "/",
    "python": "python3",
    "pip_args": "",
}
ROLE_KEYS: dict[str, Any] = {"config": "", "args": "", "extras": "worker", "env_file": ""}
HOST_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
WORKER_ID = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_GRPC_PORT = 50051


class InventoryError(ValueError):
    """The inventory cannot be deployed; the message lists every problem found."""


@dataclass
class Target:
    """One host and everything it runs."""

    host: str
    settings: dict[str, Any]  # HOST_KEYS, resolved
    master: bool = False
    workers: list[str] = field(default_factory=list)
    extras: set[str] = field(default_factory=set)


@dataclass
class Plan:
    targets: list[Target]
    worker_ids: list[str]
    worker_configs: list[str]
    worker_args: list[str]
    worker_env_files: list[str]
    master: dict[str, str]  # M_CONFIG, M_ENV_FILE, M_ARGS, M_ADDRESS


class _Reader:
    def __init__(self, inv: dict[str, Any], base: Path) -> None:
        self.inv = inv
        self.base = base
        self.defaults: dict[str, Any] = inv.get("defaults", {})
        self.problems: list[str] = []
        self.targets: dict[str, Target] = {}

    def check_keys(self, table: dict[str, Any], where: str, allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            known = ", ".join(sorted(allowed))
            self.problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {known}")

    def setting(self, entry: dict[str, Any], key: str, fallback: Any) -> Any:
        return entry.get(key, self.defaults.get(key, fallback))

    def local_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def local_file(self, entry: dict[str, Any], key: str, where: str, required: bool) -> str:
        value = self.setting(entry, key, "")
        if not value:
            if required:
                self.problems.append(f"{where}: no {key} (set {key} in the entry or in [defaults])")
            return ""
        path = self.local_path(value)
        if not path.is_file():
            self.problems.append(
                f"{where}: {key} {value} not found (relative paths start at {self.base})"
            )
        return str(path)

    def target_for(self, entry: dict[str, Any], where: str) -> Target:
        host = str(entry.get("host", ""))
        if not HOST_NAME.fullmatch(host):
            self.problems.append(f"{where}: host {host!r} must be a host name or address")
        values = {key: self.setting(entry, key, value) for key, value in HOST_KEYS.items()}
        if values["sudo"] is None:
            values["sudo"] = values["ssh_user"] != "root"
        for key in ("ssh_key", "known_hosts"):
            if values[key]:
                values[key] = str(self.local_path(values[key]))
        target = self.targets.setdefault(host, Target(host, values))
        for key in HOST_KEYS:
            if target.settings[key] != values[key]:
                self.problems.append(f"{where}: {key} differs from another entry for host {host}")
        extras = str(self.setting(entry, "extras", "worker"))
        target.extras.update(e.strip() for e in extras.split(",") if e.strip())
        return target

    def master_settings(self, master: dict[str, Any] | None) -> dict[str, str]:
        if master is None:
            address = str(self.defaults.get("address", ""))
            return {"M_CONFIG": "", "M_ENV_FILE": "", "M_ARGS": "", "M_ADDRESS": address}
        self.target_for(master, "[master]").master = True
        port = master.get("grpc_port", DEFAULT_GRPC_PORT)
        args = f"--host 0.0.0.0 --port {port} {self.setting(master, 'args', '')}".strip()
        return {
            "M_CONFIG": self.local_file(master, "config", "[master]", True),
            "M_ENV_FILE": self.local_file(master, "env_file", "[master]", False),
            "M_ARGS": args,
            "M_ADDRESS": str(master.get("address", f"{master.get('host', '')}:{port}")),
        }

    def plan(self) -> Plan:
        inv, role_keys = self.inv, {*HOST_KEYS, *ROLE_KEYS}
        master = inv.get("master")
        workers = inv.get("workers", [])
        self.check_keys(inv, "top level", {"defaults", "master", "workers"})
        self.check_keys(self.defaults, "[defaults]", role_keys)
        if master is None and not workers:
            self.problems.append("nothing to deploy: no [master] and no [[workers]]")
        if master is not None:
            self.check_keys(master, "[master]", {*role_keys, "host", "grpc_port", "address"})
        for n, w in enumerate(workers):
            self.check_keys(w, f"[[workers]] #{n + 1}", {*role_keys, "host", "id"})
        plan = Plan([], [], [], [], [], self.master_settings(master))
        for n, w in enumerate(workers):
            where = f"[[workers]] #{n + 1}"
            worker_id = str(w.get("id", ""))
            if not WORKER_ID.fullmatch(worker_id):
                self.problems.append(
                    f"{where}: id {worker_id!r} must be letters, digits, '.', '_' or '-'"
                )
            if worker_id in plan.worker_ids:
                self.problems.append(f"{where}: worker id {worker_id} appears twice")
            self.target_for(w, where).workers.append(worker_id)
            plan.worker_ids.append(worker_id)
            plan.worker_configs.append(self.local_file(w, "config", where, True))
            plan.worker_env_files.append(self.local_file(w, "env_file", where, False))
            plan.worker_args.append(str(self.setting(w, "args", "")))
        if workers and not plan.master["M_ADDRESS"]:
            self.problems.append(
                "workers need the master's address: add [master] or [master] address"
            )
        plan.targets = list(self.targets.values())
        return plan


def read_inventory(path: Path) -> Plan:
    """The deployment plan in `path`; InventoryError lists every problem found."""
    try:
        inv = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InventoryError(f"inventory {path}: {error}") from None
    reader = _Reader(inv, path.resolve().parent)
    plan = reader.plan()
    if reader.problems:
        raise InventoryError(f"inventory {path}:\n  " + "\n  ".join(reader.problems))
    return plan


def shell_assignments(plan: Plan) -> str:
    """The plan as bash assignments, one per line, every value shell-quoted."""

    def array(name: str, values: list[Any]) -> str:
        return f"{name}=(" + " ".join(shlex.quote(str(v)) for v in values) + ")"

    ts = plan.targets
    lines = [array("T_HOST", [t.host for t in ts])]
    lines += [
        array("T_" + key.upper(), [t.settings[key] for t in ts])
        for key in HOST_KEYS
        if key != "sudo"
    ]
    lines += [
        array("T_SUDO", [int(bool(t.settings["sudo"])) for t in ts]),
        array("T_MASTER", [int(t.master) for t in ts]),
        array("T_WORKERS", [" ".join(t.workers) for t in ts]),
        array("T_EXTRAS", [",".join(sorted(t.extras)) for t in ts]),
        array("W_IDS", plan.worker_ids),
        array("W_CONFIG", plan.worker_configs),
        array("W_ARGS", plan.worker_args),
        array("W_ENV_FILE", plan.worker_env_files),
    ]
    lines += [f"{key}={shlex.quote(value)}" for key, value in plan.master.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m flq.inventory INVENTORY.toml", file=sys.stderr)
        return 2
    try:
        plan = read_inventory(Path(argv[0]))
    except InventoryError as error:
        print(error, file=sys.stderr)
        return 1
    sys.stdout.write(shell_assignments(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

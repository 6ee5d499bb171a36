"""The committed stubs are exactly what grpcio-tools 1.62.x generates from the .proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("flq_pb2.py", "flq_pb2.pyi", "flq_pb2_grpc.py")


def _proto_python() -> str:
    # `make test` points this at the tool venv (.venv-proto) that holds grpcio-tools 1.62.x.
    path = os.environ.get("FLQ_PROTO_PYTHON", str(ROOT / ".venv-proto" / "bin" / "python"))
    assert Path(path).exists(), f"{path} missing: run `make test` (it builds .venv-proto)"
    return path


@pytest.mark.proto_venv
def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    python = _proto_python()
    version = subprocess.run(
        [
            python,
            "-c",
            "import grpc_tools; from importlib.metadata import version; "
            "print(version('grpcio-tools'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert version.startswith("1.62."), f"stubs must come from grpcio-tools 1.62.x, got {version}"
    subprocess.run(
        [python, str(ROOT / "tools" / "gen_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in GENERATED:
        committed = (ROOT / "flq" / "pb" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"flq/pb/{name} is stale: run make proto"


@pytest.mark.proto_venv
def test_stubs_import_on_protobuf_4_25() -> None:
    # The tool venv carries protobuf 4.25 (JetPack 6's line): the stubs must load there too.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import google.protobuf as p; assert p.__version__.startswith('4.25'), p.__version__;"
        "import flq.pb.flq_pb2 as m; print(len(m.DESCRIPTOR.services_by_name))"
    )
    out = subprocess.run(
        [_proto_python(), "-c", code, str(ROOT)], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "1"


def test_importing_stubs_does_not_load_tensorflow() -> None:
    code = "import sys, flq.serde, flq.cli.main; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"

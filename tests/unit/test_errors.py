"""Exit codes come from the error's class (flq/errors.py), one line on stderr, no traceback."""

from __future__ import annotations

import pytest
import typer

from flq import errors
from flq.admin import AccessRefused, MasterUnreachable
from flq.certs import CertsError
from flq.cli.errors import handle_errors
from flq.codec import CodecError
from flq.config import ConfigError
from flq.learning.data import DataError
from flq.security import SecurityError
from flq.worker.connection import FatalConnectionError


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("model.lr: got -1"), errors.EXIT_USAGE),
        (CodecError("bits: got 9"), errors.EXIT_USAGE),
        (SecurityError("token file missing"), errors.EXIT_USAGE),
        (CertsError("would overwrite ca.key"), errors.EXIT_USAGE),
        (DataError("no IDX files in /nowhere"), errors.EXIT_DATA),
        (MasterUnreachable("cannot reach 10.0.0.5:50051"), errors.EXIT_UNREACHABLE),
        (AccessRefused("the master refused the token"), errors.EXIT_REFUSED),
        (FatalConnectionError("protocol version 2, master speaks 1"), errors.EXIT_REFUSED),
        (errors.FlqError("anything else"), errors.EXIT_RUNTIME),
    ],
)
def test_each_error_exits_with_its_code_and_one_line(
    error: Exception, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    @handle_errors
    def command() -> None:
        raise error

    with pytest.raises(typer.Exit) as exited:
        command()
    assert exited.value.exit_code == code
    assert capsys.readouterr().err.strip() == f"error: {error}"


def test_an_unknown_error_is_not_swallowed() -> None:
    @handle_errors
    def command() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        command()


def test_every_violation_code_is_a_grpc_status_and_unknown_names_are_refused() -> None:
    import grpc

    from flq.link import ProtocolViolation, ViolationCode

    for code in ViolationCode:
        assert grpc.StatusCode[code.name].name == code.value
    assert ProtocolViolation("INVALID_ARGUMENT", "x").code is ViolationCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="NOT_A_STATUS"):
        ProtocolViolation("NOT_A_STATUS", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("UNAVAILABLE", MasterUnreachable),
        ("DEADLINE_EXCEEDED", MasterUnreachable),
        # a master that stops ends the calls in flight: `flq stop --wait` must read it as gone
        ("CANCELLED", MasterUnreachable),
        ("UNAUTHENTICATED", AccessRefused),
        ("PERMISSION_DENIED", AccessRefused),
    ],
)
def test_admin_status_codes_map_to_the_error_an_operator_acts_on(code: str, kind: type) -> None:
    import grpc

    from flq.admin import _admin_error

    error = _admin_error("127.0.0.1:50051", grpc.StatusCode[code], "details")
    assert type(error) is kind
    assert "127.0.0.1:50051" in str(error)

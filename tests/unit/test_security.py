"""Tokens, the authenticator, TLS file loading and `flq certs`: the pieces, without a server."""

from __future__ import annotations

import ipaddress
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs
from typer.testing import CliRunner

from flq.certs import CertsError, add_workers, init_directory
from flq.cli.main import app
from flq.config import ConfigError, SecurityConfig, config_from_dict, default_config, with_overrides
from flq.security import (
    AUTH_HEADER,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    WORKER_ID_HEADER,
    Authenticator,
    SecurityError,
    TokenBook,
    bearer_token,
    client_token,
    hash_token,
    load_client_tls,
    load_master_security,
    token_digest,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TOKEN_W0 = "tok-w0-abcdefghijklmnop"
TOKEN_W1 = "tok-w1-qrstuvwxyz012345"


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    yield
    # `flq`'s callback configures structlog to print to the CLI runner's (now closed) stream.
    structlog.reset_defaults()


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def metadata(worker: str | None = None, token: str | None = None) -> dict[str, str]:
    data = {}
    if worker is not None:
        data[WORKER_ID_HEADER] = worker
    if token is not None:
        data[AUTH_HEADER] = f"Bearer {token}"
    return data


# ---------------------------------------------------------------- tokens file


def test_tokens_file_accepts_plain_and_hashed_tokens_and_comments(tmp_path: Path) -> None:
    path = secret_file(
        tmp_path / "tokens.txt",
        f"# fleet tokens\n\nw0 {TOKEN_W0}\nw1 {hash_token(TOKEN_W1)}   # board in lab 2\n",
    )
    book = TokenBook.load(path)
    assert len(book) == 2
    assert book.owner_of(TOKEN_W0) == "w0"
    assert book.owner_of(TOKEN_W1) == "w1"
    assert book.owner_of(hash_token(TOKEN_W1)) is None  # the digest itself is not a password
    assert book.owner_of("nope") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"w0 {TOKEN_W0} extra\n", "line 1: expected `worker_id token`"),
        (f"w0 {TOKEN_W0}\nw0 {TOKEN_W1}\n", "line 2: worker 'w0' appears twice"),
        ("# nothing\n", "no `worker_id token` lines"),
        ("w0 sha256:abc\n", "64 hex digits"),
    ],
    ids=["three-fields", "duplicate", "empty", "short-digest"],
)
def test_bad_tokens_files_name_the_line_but_never_the_token(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = secret_file(tmp_path / "tokens.txt", text)
    with pytest.raises(SecurityError, match=problem) as error:
        TokenBook.load(path)
    assert TOKEN_W0 not in str(error.value) and TOKEN_W1 not in str(error.value)


def test_a_missing_tokens_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match=r"no such file .*absent\.txt"):
        TokenBook.load(tmp_path / "absent.txt")


def test_secret_files_readable_by_others_are_warned_about(tmp_path: Path) -> None:
    exposed = secret_file(tmp_path / "open.txt", f"w0 {TOKEN_W0}\n", mode=0o644)
    private = secret_file(tmp_path / "private.txt", f"w0 {TOKEN_W0}\n")
    with capture_logs() as logs:
        TokenBook.load(private)
        assert not logs
        TokenBook.load(exposed)
    assert [e["event"] for e in logs] == ["secret file readable by other users; chmod 600 it"]
    assert logs[0]["path"] == str(exposed) and logs[0]["mode"] == "0o644"
    assert TOKEN_W0 not in repr(logs)


# ---------------------------------------------------------------- the authenticator


@pytest.fixture
def book() -> TokenBook:
    return TokenBook.from_tokens({"w0": TOKEN_W0, "w1": hash_token(TOKEN_W1)})


@pytest.mark.parametrize(
    ("claimed", "token", "code", "identity"),
    [
        ("w0", TOKEN_W0, "OK", "w0"),
        (None, TOKEN_W1, "OK", "w1"),  # no claim: the token decides who this is
        ("w0", None, UNAUTHENTICATED, None),
        ("w0", "guess", UNAUTHENTICATED, None),
        ("w1", TOKEN_W0, PERMISSION_DENIED, None),
        ("w9", TOKEN_W0, PERMISSION_DENIED, None),
    ],
    ids=["own-token", "token-only", "no-token", "wrong-token", "impersonation", "unknown-id"],
)
def test_worker_tokens_decide_identity(
    book: TokenBook, claimed: str | None, token: str | None, code: str, identity: str | None
) -> None:
    result = Authenticator(book).check_worker(metadata(claimed, token))
    assert result.code == code
    assert result.worker_id == identity
    assert (token or "@@") not in result.reason


def test_without_tokens_workers_are_not_bound_to_an_id() -> None:
    result = Authenticator().check_worker(metadata("w5"))
    assert result.ok and result.worker_id is None


def test_mutual_tls_binds_the_certificate_name_to_the_worker(book: TokenBook) -> None:
    auth = Authenticator(book, bind_cert_name=True)
    assert auth.check_worker(metadata("w0", TOKEN_W0), ["w0"]).ok
    wrong = auth.check_worker(metadata("w0", TOKEN_W0), ["w1"])
    assert wrong.code == PERMISSION_DENIED and "certificate" in wrong.reason
    # Certificates alone (no tokens file): the certificate's name is the identity.
    only_certs = Authenticator(bind_cert_name=True).check_worker(metadata("w3"), ["w3"])
    assert only_certs.ok and only_certs.worker_id == "w3"


def test_admin_token_is_checked_against_its_digest() -> None:
    auth = Authenticator(admin_digest=token_digest("admin-secret"))
    assert auth.check_admin(metadata(token="admin-secret")).ok
    assert auth.check_admin(metadata(token="admin")).code == UNAUTHENTICATED
    assert auth.check_admin({}).reason == "admin token required"
    assert Authenticator().check_admin({}).ok  # no admin token configured: open


def test_bearer_token_parsing() -> None:
    assert bearer_token({AUTH_HEADER: "Bearer abc"}) == "abc"
    assert bearer_token({AUTH_HEADER: "bearer  abc "}) == "abc"
    assert bearer_token({AUTH_HEADER: "Basic abc"}) is None
    assert bearer_token({AUTH_HEADER: "Bearer "}) is None
    assert bearer_token({}) is None


# ---------------------------------------------------------------- client side


def test_client_token_prefers_the_file_then_the_environment(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "w0.token", TOKEN_W0 + "\n")
    assert client_token(path, "FLQ_X", {"FLQ_X": "from-env"}) == TOKEN_W0
    assert client_token(None, "FLQ_X", {"FLQ_X": " from-env\n"}) == "from-env"
    assert client_token(None, "FLQ_X", {}) is None
    two_lines = secret_file(tmp_path / "bad.token", "a b\n")
    with pytest.raises(SecurityError, match="one token on one line"):
        client_token(two_lines, "FLQ_X", {})


def test_client_tls_needs_certificate_and_key_together(tmp_path: Path) -> None:
    assert load_client_tls(None) is None
    with pytest.raises(SecurityError, match="go together"):
        load_client_tls(None, tmp_path / "c.pem")
    with pytest.raises(SecurityError, match=r"CA certificate: no such file .*ca\.pem"):
        load_client_tls(tmp_path / "ca.pem")


def test_a_missing_tls_file_is_a_usage_error_in_the_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["status", "--master", "127.0.0.1:1", "--tls-ca", str(tmp_path / "missing.pem")]
    )
    assert result.exit_code == 2
    assert "missing.pem" in result.output


# ---------------------------------------------------------------- master side


def test_master_security_warns_about_every_open_door() -> None:
    with capture_logs() as logs:
        security = load_master_security(SecurityConfig(), environ={})
    assert security.tls is None and security.auth.tokens is None
    events = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert any("unencrypted" in e for e in events)
    assert any("workers are not authenticated" in e for e in events)
    assert any("admin RPCs" in e for e in events)


def test_master_security_reads_the_admin_digest_from_the_environment() -> None:
    cfg = SecurityConfig(admin_token_env="MY_ADMIN")
    security = load_master_security(cfg, environ={"MY_ADMIN": hash_token("a-token")})
    assert security.auth.check_admin(metadata(token="a-token")).ok
    assert not security.auth.check_admin(metadata(token=hash_token("a-token"))).ok


def test_security_config_checks_pairs() -> None:
    with pytest.raises(ConfigError, match=r"tls_cert and security\.tls_key must be set together"):
        with_overrides(default_config(), {"security.tls_cert": "server.pem"})
    with pytest.raises(ConfigError, match="require_client_cert needs"):
        with_overrides(default_config(), {"security.require_client_cert": True})


# ---------------------------------------------------------------- flq certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs") / "fleet"
    init_directory(directory, "master.lab", ["w0", "w1"])
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_init_writes_every_file_private(certs: Path) -> None:
    names = sorted(p.name for p in certs.iterdir())
    expected = ["admin", "w0", "w1"]
    assert names == sorted(
        [f"{n}.{ext}" for n in expected for ext in ("pem", "key", "token")]
        + ["ca.pem", "ca.key", "server.pem", "server.key", "tokens.txt"]
        + ["master.env", "security.toml"]
    )
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for path in certs.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_certs_chain_to_the_ca_with_the_right_names_and_uses(certs: Path) -> None:
    ca = _cert(certs / "ca.pem")
    server = _cert(certs / "server.pem")
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["master.lab", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("w0", "w1", "admin"):
        client = _cert(certs / f"{name}.pem")
        client.verify_directly_issued_by(ca)
        common_name = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert common_name == name
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_certs_tokens_match_what_the_master_holds(certs: Path) -> None:
    book = TokenBook.load(certs / "tokens.txt")
    tokens = {w: (certs / f"{w}.token").read_text().strip() for w in ("w0", "w1")}
    assert tokens["w0"] != tokens["w1"] and len(tokens["w0"]) >= 40
    assert {w: book.owner_of(t) for w, t in tokens.items()} == {"w0": "w0", "w1": "w1"}
    for token in tokens.values():
        assert token not in (certs / "tokens.txt").read_text()  # digests only
    name, _, digest = (certs / "master.env").read_text().strip().partition("=")
    admin = (certs / "admin.token").read_text().strip()
    assert name == "FLQ_ADMIN_TOKEN" and digest == hash_token(admin)


def test_certs_security_section_is_a_valid_master_config(certs: Path) -> None:
    section = tomllib.loads((certs / "security.toml").read_text())
    cfg = config_from_dict(section)
    assert cfg.security.require_client_cert
    assert Path(cfg.security.tls_cert) == (certs / "server.pem").resolve()
    security = load_master_security(cfg.security, environ={})
    assert security.tls is not None and security.tls.ca is not None
    assert security.auth.tokens is not None and len(security.auth.tokens) == 2


def test_certs_never_overwrite_and_add_workers_later(tmp_path: Path) -> None:
    directory = tmp_path / "fleet"
    init_directory(directory, "10.0.0.5", ["w0"])
    with pytest.raises(CertsError, match="already holds a CA"):
        init_directory(directory, "10.0.0.5", ["w0"])
    written = add_workers(directory, ["w1"])
    assert [p.name for p in written] == ["w1.key", "w1.pem", "w1.token"]
    book = TokenBook.load(directory / "tokens.txt")
    assert book.owner_of((directory / "w1.token").read_text().strip()) == "w1"
    assert book.owner_of((directory / "w0.token").read_text().strip()) == "w0"
    with pytest.raises(CertsError, match="w1"):
        add_workers(directory, ["w1"])
    _cert(directory / "w1.pem").verify_directly_issued_by(_cert(directory / "ca.pem"))


@pytest.mark.parametrize("ids", [["w 0"], ["admin"], ["w0", "w0"], [""]])
def test_certs_refuse_bad_worker_ids(tmp_path: Path, ids: list[str]) -> None:
    with pytest.raises(CertsError):
        init_directory(tmp_path / "x", "h", ids)


def test_certs_cli_reports_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["certs", "init", str(tmp_path / "c"), "--master-host", "m"])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["certs", "init", str(tmp_path / "c"), "--master-host", "m"])
    assert again.exit_code == 2 and "already holds a CA" in again.output

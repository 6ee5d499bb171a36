"""Everything TLS and tokens need for a federation, issued in one go (`flq certs`'s library).

`init_directory` creates a private CA, the master's server certificate (SAN: the master host,
localhost, 127.0.0.1, ::1), one client certificate per worker (common name = worker id, which
mutual TLS binds to the id) and one for the admin, a token per worker, the admin token, and the
master's view of the tokens (SHA-256 digests only: the master's disk never holds a usable token).
`add_workers` issues more boards later with the same CA. Every file is written 0600 in a 0700
directory, and never over an existing file. Keys are ECDSA P-256: small, fast on a Jetson,
accepted by gRPC's TLS.

Files, for the master: ca.pem server.pem server.key tokens.txt master.env (FLQ_ADMIN_TOKEN as a
digest) security.toml (the [security] section to paste); for worker w0: ca.pem w0.pem w0.key
w0.token; for the admin: ca.pem admin.pem admin.key admin.token.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flq.errors import UsageError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

ADMIN_NAME = "admin"
CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers and most tooling still accept for a leaf certificate
TOKEN_BYTES = 32
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CertsError(UsageError, ValueError):
    """Bad arguments or a file that would be overwritten (exit code 2, see flq/errors.py)."""


# ---------------------------------------------------------------- files


def _write_secret(path: Path, data: bytes, force: bool = False) -> None:
    """Create `path` with mode 0600 from the first byte on (no window where it is readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CertsError(f"{path} exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by the umask; an existing file kept its own


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FLQ"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: str, issuer: x509.Name, public_key: Any, days: int
) -> x509.CertificateBuilder:
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_authority(common_name: str = "FLQ CA", days: int = CA_DAYS) -> Authority:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    cert = (
        _builder(common_name, _name(common_name), key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def _subject_alt_names(hosts: list[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(
    ca: Authority, common_name: str, *, server_hosts: list[str] | None = None, days: int = LEAF_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate: for a server when `server_hosts` is given, else for a client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server_hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_subject_alt_names(server_hosts)), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256()), key


def load_authority(directory: Path) -> Authority:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as error:
        raise CertsError(f"{directory}: cannot load ca.pem/ca.key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{directory}/ca.key: expected an EC key")
    return Authority(cert, key)


# ---------------------------------------------------------------- the commands' work


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def _check_ids(worker_ids: list[str]) -> None:
    for worker_id in worker_ids:
        if not WORKER_ID.match(worker_id) or worker_id == ADMIN_NAME:
            raise CertsError(
                f"worker id {worker_id!r}: use letters, digits, '_', '.', '-' (not {ADMIN_NAME!r})"
            )
    if len(set(worker_ids)) != len(worker_ids):
        raise CertsError(f"worker ids repeat: {worker_ids}")


def _issue_client(ca: Authority, directory: Path, name: str) -> str:
    cert, key = issue(ca, name)
    token = new_token()
    _write_secret(directory / f"{name}.pem", _pem_cert(cert))
    _write_secret(directory / f"{name}.key", _pem_key(key))
    _write_secret(directory / f"{name}.token", (token + "\n").encode())
    return token


def _append_tokens(directory: Path, tokens: dict[str, str]) -> None:
    from flq.security import hash_token

    path = directory / "tokens.txt"
    lines = "".join(f"{worker} {hash_token(token)}\n" for worker, token in tokens.items())
    if path.exists():
        existing = {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
        clash = sorted(existing & set(tokens))
        if clash:
            raise CertsError(f"{path}: already has tokens for {clash}")
        with path.open("a") as handle:
            handle.write(lines)
        os.chmod(path, 0o600)
    else:
        header = "# worker_id sha256:<digest of its token>   (written by flq certs)\n"
        _write_secret(path, (header + lines).encode())


def init_directory(directory: Path, master_host: str, worker_ids: list[str]) -> list[Path]:
    """Create every file of a new deployment; returns what was written."""
    from flq.security import hash_token

    _check_ids(worker_ids)
    if not master_host or any(c.isspace() for c in master_host):
        raise CertsError(f"--master-host: got {master_host!r}, expected a host name or address")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if (directory / "ca.key").exists():
        raise CertsError(f"{directory} already holds a CA; use `flq certs add-worker` for more")
    before = set(directory.iterdir())
    ca = create_authority()
    _write_secret(directory / "ca.pem", _pem_cert(ca.cert))
    _write_secret(directory / "ca.key", _pem_key(ca.key))
    hosts = [master_host, "localhost", "127.0.0.1", "::1"]
    cert, key = issue(ca, master_host, server_hosts=hosts)
    _write_secret(directory / "server.pem", _pem_cert(cert))
    _write_secret(directory / "server.key", _pem_key(key))
    admin_token = _issue_client(ca, directory, ADMIN_NAME)
    _write_secret(directory / "master.env", f"FLQ_ADMIN_TOKEN={hash_token(admin_token)}\n".encode())
    tokens = {worker: _issue_client(ca, directory, worker) for worker in worker_ids}
    if tokens:
        _append_tokens(directory, tokens)
    _write_secret(directory / "security.toml", security_section(directory, bool(tokens)).encode())
    return sorted(set(directory.iterdir()) - before)


def add_workers(directory: Path, worker_ids: list[str]) -> list[Path]:
    _check_ids(worker_ids)
    ca = load_authority(directory)
    before = set(directory.iterdir())
    for worker in worker_ids:
        if (directory / f"{worker}.pem").exists():
            raise CertsError(
                f"{directory}/{worker}.pem exists; worker {worker!r} has a certificate"
            )
    tokens = {worker: _issue_client(ca, directory, worker) for worker in worker_ids}
    _append_tokens(directory, tokens)
    return sorted(set(directory.iterdir()) - before)


def security_section(directory: Path, with_tokens: bool) -> str:
    root = directory.resolve()

    def path(name: str) -> str:
        return json.dumps(str(root / name))  # a JSON string is a TOML basic string

    tokens = f"tokens_file = {path('tokens.txt')}\n" if with_tokens else ""
    return (
        "# Paste into the master's config; the paths are where `flq certs init` wrote the files.\n"
        "[security]\n"
        f"tls_cert = {path('server.pem')}\n"
        f"tls_key = {path('server.key')}\n"
        f"tls_ca = {path('ca.pem')}\n"
        "require_client_cert = true\n"
        f"{tokens}"
        'admin_token_env = "FLQ_ADMIN_TOKEN"   # its value is in master.env (a digest)\n'
    )

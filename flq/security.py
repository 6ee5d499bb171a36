"""TLS material, worker tokens and the admin token: loading, checking, gRPC credentials.

The master knows each worker by a token (a tokens file of `worker_id token` lines, the token
written plain or as `sha256:<hex>` so the master's disk need not hold the secret) and admins by
one admin token read from an environment variable. Clients send `authorization: Bearer <token>`
in the call's metadata; workers add `x-flq-worker-id`. The servicer asks an `Authenticator`
before anything of a call is read, so a refused caller changes nothing.

Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every entry (no early
exit that would tell which entry was close). No function here puts a token into a message,
an exception or a log line: errors name files and worker ids, never secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from flq.config import SecurityConfig
from flq.errors import UsageError
from flq.serde import WireError, identifier

log = structlog.get_logger("flq.security")

AUTH_HEADER = "authorization"
WORKER_ID_HEADER = "x-flq-worker-id"
BEARER = "bearer "
HASH_PREFIX = "sha256:"
WORKER_TOKEN_ENV = "FLQ_WORKER_TOKEN"
DEFAULT_ADMIN_TOKEN_ENV = "FLQ_ADMIN_TOKEN"
OK, UNAUTHENTICATED, PERMISSION_DENIED = "OK", "UNAUTHENTICATED", "PERMISSION_DENIED"


class SecurityError(UsageError, ValueError):
    """A certificate, key, tokens file or token is missing or malformed; says which file."""


# ---------------------------------------------------------------- files


def read_file_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{what}: no such file {file}") from None
    except OSError as error:
        raise SecurityError(f"{what}: cannot read {file}: {error.strerror or error}") from None
    if not data.strip():
        raise SecurityError(f"{what}: {file} is empty")
    return data


def warn_if_exposed(path: str | os.PathLike[str], what: str) -> bool:
    """Log a warning when a secret file is readable by group or others; True if it is."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return False
    exposed = bool(mode & (stat.S_IRWXG | stat.S_IRWXO))
    if exposed:
        log.warning(
            "secret file readable by other users; chmod 600 it",
            what=what,
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
        )
    return exposed


def read_token_file(path: str | os.PathLike[str], what: str = "token file") -> str:
    warn_if_exposed(path, what)
    try:
        text = read_file_bytes(path, what).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecurityError(f"{what}: {path} is not UTF-8 text") from None
    if any(char.isspace() for char in text):
        raise SecurityError(f"{what}: {path} must hold one token on one line")
    return text


def client_token(
    token_file: str | os.PathLike[str] | None,
    env_var: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """A client's token: from `token_file` if given, else from the environment, else None."""
    if token_file is not None:
        return read_token_file(token_file)
    value = (os.environ if environ is None else environ).get(env_var, "").strip()
    return value or None


# ---------------------------------------------------------------- tokens


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def hash_token(token: str) -> str:
    """The stored form of a token: `sha256:<hex>`; whoever holds it cannot log in with it."""
    return HASH_PREFIX + token_digest(token).hex()


def _stored_digest(stored: str, where: str) -> bytes:
    if stored.startswith(HASH_PREFIX):
        try:
            digest = bytes.fromhex(stored[len(HASH_PREFIX) :])
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise SecurityError(f"{where}: {HASH_PREFIX} needs 64 hex digits")
        return digest
    return token_digest(stored)


class TokenBook:
    """worker_id -> token digest, from a tokens file."""

    def __init__(self, digests: Mapping[str, bytes]) -> None:
        self._digests = dict(digests)

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, str]) -> TokenBook:
        return cls({worker: _stored_digest(t, worker) for worker, t in tokens.items()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenBook:
        warn_if_exposed(path, "tokens file")
        text = read_file_bytes(path, "tokens file").decode("utf-8", errors="replace")
        digests: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            content = line.split("#", 1)[0].strip()
            if not content:
                continue
            parts = content.split()
            where = f"tokens file {path}, line {number}"
            if len(parts) != 2:  # the message must not echo the line: it may hold a token
                raise SecurityError(f"{where}: expected `worker_id token`")
            worker, stored = parts
            if worker in digests:
                raise SecurityError(f"{where}: worker {worker!r} appears twice")
            digests[worker] = _stored_digest(stored, where)
        if not digests:
            raise SecurityError(f"tokens file {path}: no `worker_id token` lines")
        return cls(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def owner_of(self, token: str) -> str | None:
        """The worker this token belongs to, or None; compares against every entry."""
        presented = token_digest(token)
        owner = None
        for worker, digest in self._digests.items():
            if hmac.compare_digest(presented, digest) and owner is None:
                owner = worker
        return owner


# ---------------------------------------------------------------- checking a call


@dataclass(frozen=True)
class AuthResult:
    code: str  # OK | UNAUTHENTICATED | PERMISSION_DENIED (gRPC status names)
    reason: str = ""
    worker_id: str | None = None  # the identity a worker session is bound to, if any

    @property
    def ok(self) -> bool:
        return self.code == OK


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    value = metadata.get(AUTH_HEADER, "")
    if not value.lower().startswith(BEARER):
        return None
    return value[len(BEARER) :].strip() or None


def worker_metadata(worker_id: str, token: str | None) -> tuple[tuple[str, str], ...]:
    """What a worker sends with its Session call."""
    if token is None:
        return ((WORKER_ID_HEADER, worker_id),)
    return ((WORKER_ID_HEADER, worker_id), (AUTH_HEADER, f"Bearer {token}"))


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else ((AUTH_HEADER, f"Bearer {token}"),)


class Authenticator:
    """Decides whether a call may proceed. No tokens configured = that check is open."""

    def __init__(
        self,
        tokens: TokenBook | None = None,
        admin_digest: bytes | None = None,
        bind_cert_name: bool = False,
    ) -> None:
        self.tokens = tokens
        self.admin_digest = admin_digest
        self.bind_cert_name = bind_cert_name  # mTLS: the certificate's CN must be the worker id

    def check_worker(
        self, metadata: Mapping[str, str], cert_names: Sequence[str] = ()
    ) -> AuthResult:
        claimed = metadata.get(WORKER_ID_HEADER) or None
        if claimed is not None:
            try:
                identifier(claimed, WORKER_ID_HEADER)
            except WireError as error:  # a credential we cannot read is no credential
                return AuthResult(UNAUTHENTICATED, str(error))
        identity: str | None = None
        if self.tokens is not None:
            token = bearer_token(metadata)
            if token is None:
                return AuthResult(UNAUTHENTICATED, f"no worker token (claims {claimed!r})")
            identity = self.tokens.owner_of(token)
            if identity is None:
                return AuthResult(UNAUTHENTICATED, f"unknown worker token (claims {claimed!r})")
            if claimed is not None and claimed != identity:
                return AuthResult(
                    PERMISSION_DENIED, f"token of worker {identity!r} used to claim {claimed!r}"
                )
        if self.bind_cert_name and cert_names:
            if identity is None:
                identity = cert_names[0]
            if identity not in cert_names:
                return AuthResult(
                    PERMISSION_DENIED,
                    f"client certificate is for {list(cert_names)}, not worker {identity!r}",
                )
        return AuthResult(OK, worker_id=identity)

    def check_admin(self, metadata: Mapping[str, str]) -> AuthResult:
        if self.admin_digest is None:
            return AuthResult(OK)
        token = bearer_token(metadata)
        if token is None:
            return AuthResult(UNAUTHENTICATED, "admin token required")
        if not hmac.compare_digest(token_digest(token), self.admin_digest):
            return AuthResult(UNAUTHENTICATED, "wrong admin token")
        return AuthResult(OK)


# ---------------------------------------------------------------- TLS


@dataclass(frozen=True)
class ServerTls:
    cert: bytes
    key: bytes
    ca: bytes | None
    require_client_cert: bool


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (ca; None = the system's roots) and, for mutual TLS, who it is."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None


def load_client_tls(
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ClientTls | None:
    """TLS settings from file paths; None when none is given (plaintext)."""
    if (cert is None) != (key is None):
        raise SecurityError("--tls-cert and --tls-key go together (mutual TLS)")
    if ca is None and cert is None:
        return None
    if key is not None:
        warn_if_exposed(key, "client key")
    return ClientTls(
        ca=None if ca is None else read_file_bytes(ca, "CA certificate"),
        cert=None if cert is None else read_file_bytes(cert, "client certificate"),
        key=None if key is None else read_file_bytes(key, "client key"),
    )


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)],
        root_certificates=tls.ca,
        require_client_auth=tls.require_client_cert,
    )


@dataclass(frozen=True)
class MasterSecurity:
    tls: ServerTls | None
    auth: Authenticator


def load_master_security(
    cfg: SecurityConfig, environ: Mapping[str, str] | None = None
) -> MasterSecurity:
    """Read the files and the admin token the config names; warn about what is left open."""
    env = os.environ if environ is None else environ
    tls = None
    if cfg.tls_cert:
        warn_if_exposed(cfg.tls_key, "server key")
        tls = ServerTls(
            cert=read_file_bytes(cfg.tls_cert, "security.tls_cert"),
            key=read_file_bytes(cfg.tls_key, "security.tls_key"),
            ca=read_file_bytes(cfg.tls_ca, "security.tls_ca") if cfg.tls_ca else None,
            require_client_cert=cfg.require_client_cert,
        )
    tokens = TokenBook.load(cfg.tokens_file) if cfg.tokens_file else None
    admin = env.get(cfg.admin_token_env, "").strip() if cfg.admin_token_env else ""
    admin_digest = _stored_digest(admin, f"${cfg.admin_token_env}") if admin else None
    auth = Authenticator(tokens, admin_digest, bind_cert_name=cfg.require_client_cert)
    _warn_open_doors(tls, auth, cfg)
    return MasterSecurity(tls, auth)


def _warn_open_doors(tls: ServerTls | None, auth: Authenticator, cfg: SecurityConfig) -> None:
    if tls is None:
        log.warning(
            "gRPC link is unencrypted: set security.tls_cert and tls_key (flq certs init)",
            tokens_in_clear=auth.tokens is not None or auth.admin_digest is not None,
        )
    if auth.tokens is None and not cfg.require_client_cert:
        log.warning("workers are not authenticated: set security.tokens_file")
    if auth.admin_digest is None:
        log.warning(
            "admin RPCs (Status, Stop, GetGlobalModel) are open: set the admin token variable",
            variable=cfg.admin_token_env,
        )

"""A new session's handshake: a pure check of the Hello, then reference reconciliation.

`check_hello` decides from the message alone whether a session may start. `reconcile_references`
brings master and worker to the same references (DESIGN: a mismatch resets both sides, logged,
never silently) and `welcome_for` tells the worker what the master holds. The round engine's
`accept` sequences them around the registry.
"""

from __future__ import annotations

import structlog

from flq.link import MODEL_MISMATCH, ProtocolViolation, ViolationCode
from flq.master.registry import WorkerRecord
from flq.master.state import MasterState
from flq.types import PROTOCOL_VERSION, Hello, ModelIdentity, Welcome, WorkerMessage

log = structlog.get_logger("flq.master")


def check_hello(
    message: WorkerMessage, session_worker_id: str, model: ModelIdentity | None = None
) -> Hello:
    """The first message of a session as a Hello this master accepts; else ProtocolViolation.
    `session_worker_id` is the id the call authenticated as ("" when the call carries none);
    `model` the master's own model (None or empty digest: not checked)."""
    if not isinstance(message, Hello):
        raise ProtocolViolation(
            ViolationCode.FAILED_PRECONDITION,
            f"first message must be Hello, got {type(message).__name__}",
        )
    if session_worker_id and message.worker_id != session_worker_id:
        raise ProtocolViolation(
            ViolationCode.PERMISSION_DENIED,
            f"worker id {message.worker_id!r} differs from the session's",
        )
    if message.protocol_version != PROTOCOL_VERSION:
        # UNIMPLEMENTED, not FAILED_PRECONDITION: the worker's connection treats it as final
        # (retrying cannot teach either side the other's protocol).
        raise ProtocolViolation(
            ViolationCode.UNIMPLEMENTED,
            f"protocol version {message.protocol_version}, master speaks {PROTOCOL_VERSION}",
        )
    theirs = message.model
    if model is not None and model.digest and theirs.digest and theirs.digest != model.digest:
        raise ProtocolViolation(
            ViolationCode.FAILED_PRECONDITION,
            f"{MODEL_MISMATCH}: worker {message.worker_id!r} holds {theirs}, the master holds "
            f"{model}; give every node the same model settings (model.builder, or model.name "
            "and hidden_units) and the same dataset.num_classes",
        )
    return message


def reconcile_references(hello: Hello, record: WorkerRecord, state: MasterState) -> bool:
    """Align the worker's references with the master's; True when its upload reference was
    reset. A stale downlink reference is not reset here: next round the worker gets the chain of
    deltas it missed, when it holds a version this master process sent it or a later one it
    sent (the same lineage) and the master still has them, else a float32 keyframe
    (record.download_version = -1)."""
    master_version = state.store.version(hello.worker_id)
    reset = master_version != hello.upload_ref_version
    if reset:
        log.warning(
            "reference mismatch: resetting",
            worker=hello.worker_id,
            master_version=master_version,
            worker_version=hello.upload_ref_version,
        )
        state.store.reset(hello.worker_id)
    held = hello.download_ref_version
    lineage = 0 < record.first_download_version <= held <= record.download_version
    known = held == state.downlink.version or lineage
    record.download_version = held if known else -1
    return reset


def welcome_for(hello: Hello, session_id: str, state: MasterState, reset: bool) -> Welcome:
    return Welcome(
        worker_id=hello.worker_id,
        protocol_version=PROTOCOL_VERSION,
        session_id=session_id,
        round=state.round,
        reset_references=reset,
        upload_ref_version=state.store.version(hello.worker_id),
        download_ref_version=state.downlink.version,
    )

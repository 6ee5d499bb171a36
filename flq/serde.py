"""The only place that converts protobuf messages to domain types (flq.types) and back.

Functions come in pairs, `x_to_proto` / `x_from_proto`. The `_from_proto` side is the first line of
defence against a bad peer: anything structurally wrong (an empty oneof, an unknown codec, a
non-finite number, a chunk over 1 MiB) raises WireError naming the field, before any domain code
sees the message. Semantic checks (right round, right identity, shapes matching the model) belong
to the master and worker, which know the state.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from flq.codec import SPECS, Codec
from flq.codec.chunks import MAX_CHUNK_BYTES, TensorChunk
from flq.pb import flq_pb2 as pb
from flq.types import (
    Decision,
    DeviceInfo,
    EvalResult,
    Heartbeat,
    Hello,
    Location,
    MasterMessage,
    ModelChunk,
    ModelIdentity,
    ModelInfo,
    ResetReference,
    RoundConfig,
    RoundStart,
    Shutdown,
    Skip,
    StatusReply,
    UpdateChunk,
    UploadOffer,
    Welcome,
    WorkerMessage,
    WorkerStatus,
)

MAX_TENSOR_DIMS = 8
MAX_SCALES = 4
MAX_ID_BYTES = 128  # worker ids, in UTF-8 bytes
SHOWN_CHARS = 32  # how much of a refused value a log line or status may echo
MAX_FEATURES = 32  # Hello.features entries
MAX_FEATURE_NAME = 64
MAX_DIGEST_CHARS = 64  # Hello.model_digest: hex
MAX_DESCRIPTION_CHARS = 256  # Hello.model_description
SUPPORTED_DTYPES = frozenset({"float32"})


_P = TypeVar("_P")
_D = TypeVar("_D")


class WireError(ValueError):
    """A message that is structurally invalid; the text names the field and what was expected."""


def _check_codec_registry() -> None:
    """Every wire codec has a spec in the codec table and vice versa, with the same value
    (hivemind checks this at import too)."""
    wire = {name.removeprefix("CODEC_") for name in pb.Codec.DESCRIPTOR.values_by_name} - {
        "UNSPECIFIED"
    }
    local = {c.name for c in SPECS}
    if wire != local:
        raise ImportError(f"proto Codec enum {sorted(wire)} != flq.codec.SPECS {sorted(local)}")
    for c in SPECS:
        if pb.Codec.Value(f"CODEC_{c.name}") != int(c):
            raise ImportError(f"codec {c.name}: proto value differs from flq.codec value {int(c)}")


_check_codec_registry()


# ---------------------------------------------------------------- checks


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise WireError(f"{name}: got {value}, expected a finite number")
    return value


def shown(value: str) -> str:
    """`value` as a log line or a status may echo it: whole when short, else its head and its
    size, so a peer cannot write kilobytes into our logs with one field."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    size = len(value.encode("utf-8", "replace"))
    return f"{value[:SHOWN_CHARS]!r}... ({size} bytes)"


def identifier(value: str, name: str) -> str:
    """A worker id as the wire may carry it; WireError names `name` otherwise."""
    size = len(value.encode("utf-8", "replace"))
    if not value or size > MAX_ID_BYTES or not value.isprintable():
        raise WireError(
            f"{name}: got {shown(value)}, expected 1..{MAX_ID_BYTES} bytes of printable text"
        )
    return value


def _scalars_to_proto(msg: Any, proto_type: type[_P]) -> _P:
    """Messages whose fields are all plain scalars copy field by field, by name."""
    return proto_type(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)})


def _scalars_from_proto(msg: Any, domain_type: type[_D]) -> _D:
    return domain_type(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(domain_type)})  # type: ignore[arg-type]


# ---------------------------------------------------------------- tensors


def tensor_chunk_to_proto(chunk: TensorChunk) -> pb.TensorChunk:
    return pb.TensorChunk(
        tensor_index=chunk.tensor_index,
        tensor_count=chunk.tensor_count,
        shape=list(chunk.shape),
        dtype=chunk.dtype,
        codec=pb.Codec.Name(int(chunk.codec)),
        bits=chunk.bits,
        scales=list(chunk.scales),
        chunk_index=chunk.chunk_index,
        chunk_count=chunk.chunk_count,
        data=chunk.data,
    )


def tensor_chunk_from_proto(msg: pb.TensorChunk) -> TensorChunk:
    where = f"tensor {msg.tensor_index} chunk {msg.chunk_index}"
    if msg.codec not in {int(c) for c in Codec}:
        raise WireError(
            f"{where}: codec: got {msg.codec}, expected one of {[c.name for c in Codec]}"
        )
    if msg.dtype not in SUPPORTED_DTYPES:
        raise WireError(
            f"{where}: dtype: got {msg.dtype!r}, expected one of {sorted(SUPPORTED_DTYPES)}"
        )
    if len(msg.shape) > MAX_TENSOR_DIMS:
        raise WireError(
            f"{where}: shape: got {len(msg.shape)} dims, expected at most {MAX_TENSOR_DIMS}"
        )
    if len(msg.scales) > MAX_SCALES:
        raise WireError(f"{where}: scales: got {len(msg.scales)}, expected at most {MAX_SCALES}")
    if msg.tensor_count == 0 or msg.tensor_index >= msg.tensor_count:
        raise WireError(
            f"{where}: tensor_index {msg.tensor_index} / tensor_count {msg.tensor_count}: "
            "expected index < count and count >= 1"
        )
    if msg.chunk_count == 0 or msg.chunk_index >= msg.chunk_count:
        raise WireError(
            f"{where}: chunk_index {msg.chunk_index} / chunk_count {msg.chunk_count}: "
            "expected index < count and count >= 1"
        )
    if len(msg.data) > MAX_CHUNK_BYTES:
        raise WireError(
            f"{where}: data: got {len(msg.data)} bytes, expected at most {MAX_CHUNK_BYTES}"
        )
    return TensorChunk(
        tensor_index=msg.tensor_index,
        tensor_count=msg.tensor_count,
        shape=tuple(int(d) for d in msg.shape),
        dtype=msg.dtype,
        codec=Codec(msg.codec),
        bits=msg.bits,
        scales=tuple(_finite(s, f"{where}: scales") for s in msg.scales),
        chunk_index=msg.chunk_index,
        chunk_count=msg.chunk_count,
        data=bytes(msg.data),
    )


def _chunks_to_proto(chunks: Sequence[TensorChunk]) -> list[pb.TensorChunk]:
    return [tensor_chunk_to_proto(c) for c in chunks]


def _chunks_from_proto(chunks: Sequence[pb.TensorChunk]) -> tuple[TensorChunk, ...]:
    return tuple(tensor_chunk_from_proto(c) for c in chunks)


# ---------------------------------------------------------------- small parts


def device_info_to_proto(info: DeviceInfo) -> pb.DeviceInfo:
    return _scalars_to_proto(info, pb.DeviceInfo)


def device_info_from_proto(msg: pb.DeviceInfo) -> DeviceInfo:
    return _scalars_from_proto(msg, DeviceInfo)


def location_to_proto(loc: Location) -> pb.Location:
    has = loc.latitude is not None and loc.longitude is not None
    return pb.Location(
        has_coordinates=has,
        latitude=loc.latitude if has and loc.latitude is not None else 0.0,
        longitude=loc.longitude if has and loc.longitude is not None else 0.0,
        site=loc.site,
    )


def location_from_proto(msg: pb.Location) -> Location:
    if not msg.has_coordinates:
        return Location(site=msg.site)
    lat = _finite(msg.latitude, "location.latitude")
    lon = _finite(msg.longitude, "location.longitude")
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise WireError(
            f"location: got ({lat}, {lon}), "
            "expected latitude in [-90, 90] and longitude in [-180, 180]"
        )
    return Location(latitude=lat, longitude=lon, site=msg.site)


_ROUND_CONFIG_FIELDS = tuple(RoundConfig.__dataclass_fields__)


def round_config_to_proto(cfg: RoundConfig) -> pb.RoundConfig:
    return pb.RoundConfig(**{name: getattr(cfg, name) for name in _ROUND_CONFIG_FIELDS})


def round_config_from_proto(msg: pb.RoundConfig) -> RoundConfig:
    values: dict[str, Any] = {name: getattr(msg, name) for name in _ROUND_CONFIG_FIELDS}
    for name, value in values.items():
        if isinstance(value, float):
            _finite(value, f"config.{name}")
    return RoundConfig(**values)


# ---------------------------------------------------------------- worker -> master


def hello_to_proto(msg: Hello) -> pb.Hello:
    return pb.Hello(
        worker_id=msg.worker_id,
        protocol_version=msg.protocol_version,
        num_samples=msg.num_samples,
        device=device_info_to_proto(msg.device),
        location=location_to_proto(msg.location),
        upload_ref_version=msg.upload_ref_version,
        download_ref_version=msg.download_ref_version,
        features=dict(msg.features),
        model_digest=msg.model.digest,
        model_description=msg.model.description,
    )


def _features(features: Mapping[str, float]) -> dict[str, float]:
    if len(features) > MAX_FEATURES:
        raise WireError(f"hello.features: got {len(features)}, expected at most {MAX_FEATURES}")
    checked = {}
    for name, value in sorted(features.items()):
        if not name or len(name) > MAX_FEATURE_NAME or not name.isprintable():
            raise WireError(
                f"hello.features: name {name!r}, "
                f"expected 1..{MAX_FEATURE_NAME} printable characters"
            )
        checked[name] = _finite(value, f"hello.features[{name!r}]")
    return checked


def hello_from_proto(msg: pb.Hello) -> Hello:
    return Hello(
        worker_id=identifier(msg.worker_id, "hello.worker_id"),
        protocol_version=msg.protocol_version,
        num_samples=msg.num_samples,
        device=device_info_from_proto(msg.device),
        location=location_from_proto(msg.location),
        upload_ref_version=msg.upload_ref_version,
        download_ref_version=msg.download_ref_version,
        features=_features(msg.features),
        model=_model_identity(msg.model_digest, msg.model_description),
    )


def _model_identity(digest: str, description: str) -> ModelIdentity:
    if len(digest) > MAX_DIGEST_CHARS or any(c not in string.hexdigits for c in digest):
        raise WireError(
            f"hello.model_digest: got {shown(digest)}, "
            f"expected at most {MAX_DIGEST_CHARS} hex digits"
        )
    if len(description) > MAX_DESCRIPTION_CHARS or not description.isprintable():
        raise WireError(
            f"hello.model_description: got {shown(description)}, expected at most "
            f"{MAX_DESCRIPTION_CHARS} printable characters"
        )
    return ModelIdentity(digest, description)


def upload_offer_to_proto(msg: UploadOffer) -> pb.UploadOffer:
    return pb.UploadOffer(
        round=msg.round,
        wants_upload=msg.wants_upload,
        cost_bits=msg.cost_bits,
        energy=msg.energy,
        clock=msg.clock,
        forced=msg.forced,
        train_loss=msg.train_loss,
        num_samples=msg.num_samples,
        train_seconds=msg.train_seconds,
    )


def upload_offer_from_proto(msg: pb.UploadOffer) -> UploadOffer:
    energy = _finite(msg.energy, "offer.energy")
    if energy < 0:
        raise WireError(f"offer.energy: got {energy}, expected >= 0")
    train_seconds = _finite(msg.train_seconds, "offer.train_seconds")
    if train_seconds < 0:
        raise WireError(f"offer.train_seconds: got {train_seconds}, expected >= 0")
    return UploadOffer(
        round=msg.round,
        wants_upload=msg.wants_upload,
        cost_bits=msg.cost_bits,
        energy=energy,
        clock=msg.clock,
        forced=msg.forced,
        train_loss=_finite(msg.train_loss, "offer.train_loss"),
        num_samples=msg.num_samples,
        train_seconds=train_seconds,
    )


def update_chunk_to_proto(msg: UpdateChunk) -> pb.UpdateChunk:
    return pb.UpdateChunk(
        round=msg.round,
        upload_ref_version=msg.upload_ref_version,
        tensors=_chunks_to_proto(msg.tensors),
    )


def update_chunk_from_proto(msg: pb.UpdateChunk) -> UpdateChunk:
    return UpdateChunk(
        round=msg.round,
        upload_ref_version=msg.upload_ref_version,
        tensors=_chunks_from_proto(msg.tensors),
    )


def skip_to_proto(msg: Skip) -> pb.Skip:
    return _scalars_to_proto(msg, pb.Skip)


def skip_from_proto(msg: pb.Skip) -> Skip:
    return _scalars_from_proto(msg, Skip)


def eval_result_to_proto(msg: EvalResult) -> pb.EvalResult:
    return pb.EvalResult(
        round=msg.round, loss=msg.loss, accuracy=msg.accuracy, num_examples=msg.num_examples
    )


def eval_result_from_proto(msg: pb.EvalResult) -> EvalResult:
    accuracy = _finite(msg.accuracy, "eval.accuracy")
    if not 0.0 <= accuracy <= 1.0:
        raise WireError(f"eval.accuracy: got {accuracy}, expected a value in [0, 1]")
    return EvalResult(
        round=msg.round,
        loss=_finite(msg.loss, "eval.loss"),
        accuracy=accuracy,
        num_examples=msg.num_examples,
    )


def heartbeat_to_proto(msg: Heartbeat) -> pb.Heartbeat:
    return pb.Heartbeat(round=msg.round, phase=msg.phase, unix_time=msg.unix_time)


def heartbeat_from_proto(msg: pb.Heartbeat) -> Heartbeat:
    return Heartbeat(
        round=msg.round, phase=msg.phase, unix_time=_finite(msg.unix_time, "heartbeat.unix_time")
    )


# ---------------------------------------------------------------- master -> worker


def welcome_to_proto(msg: Welcome) -> pb.Welcome:
    return _scalars_to_proto(msg, pb.Welcome)


def welcome_from_proto(msg: pb.Welcome) -> Welcome:
    return _scalars_from_proto(msg, Welcome)


def round_start_to_proto(msg: RoundStart) -> pb.RoundStart:
    return pb.RoundStart(
        round=msg.round,
        config=round_config_to_proto(msg.config),
        lazy_scalar=msg.lazy_scalar,
        download_ref_version=msg.download_ref_version,
        part=msg.part,
        parts=msg.parts,
        tensors=_chunks_to_proto(msg.tensors),
    )


def round_start_from_proto(msg: pb.RoundStart) -> RoundStart:
    if msg.parts == 0 or msg.part >= msg.parts:
        raise WireError(f"round_start.part {msg.part} / parts {msg.parts}: expected part < parts")
    return RoundStart(
        round=msg.round,
        config=round_config_from_proto(msg.config),
        lazy_scalar=_finite(msg.lazy_scalar, "round_start.lazy_scalar"),
        download_ref_version=msg.download_ref_version,
        part=msg.part,
        parts=msg.parts,
        tensors=_chunks_from_proto(msg.tensors),
    )


def decision_to_proto(msg: Decision) -> pb.Decision:
    return _scalars_to_proto(msg, pb.Decision)


def decision_from_proto(msg: pb.Decision) -> Decision:
    return _scalars_from_proto(msg, Decision)


def reset_reference_to_proto(msg: ResetReference) -> pb.ResetReference:
    return _scalars_to_proto(msg, pb.ResetReference)


def reset_reference_from_proto(msg: pb.ResetReference) -> ResetReference:
    return _scalars_from_proto(msg, ResetReference)


def shutdown_to_proto(msg: Shutdown) -> pb.Shutdown:
    return _scalars_to_proto(msg, pb.Shutdown)


def shutdown_from_proto(msg: pb.Shutdown) -> Shutdown:
    return _scalars_from_proto(msg, Shutdown)


# ---------------------------------------------------------------- admin


def worker_status_to_proto(msg: WorkerStatus) -> pb.WorkerStatus:
    return _scalars_to_proto(msg, pb.WorkerStatus)


def worker_status_from_proto(msg: pb.WorkerStatus) -> WorkerStatus:
    return _scalars_from_proto(msg, WorkerStatus)


def model_info_to_proto(msg: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=msg.name,
        dataset=msg.dataset,
        hidden_units=msg.hidden_units,
        input_shape=list(msg.input_shape),
        num_classes=msg.num_classes,
        parameters=msg.parameters,
    )


def model_info_from_proto(msg: pb.ModelInfo) -> ModelInfo:
    if len(msg.input_shape) > MAX_TENSOR_DIMS:
        raise WireError(
            f"ModelInfo.input_shape: {len(msg.input_shape)} dims, max {MAX_TENSOR_DIMS}"
        )
    return ModelInfo(
        name=msg.name,
        dataset=msg.dataset,
        hidden_units=msg.hidden_units,
        input_shape=tuple(msg.input_shape),
        num_classes=msg.num_classes,
        parameters=msg.parameters,
    )


def status_reply_to_proto(msg: StatusReply) -> pb.StatusReply:
    return pb.StatusReply(
        round=msg.round,
        max_rounds=msg.max_rounds,
        state=msg.state,
        accuracy=msg.accuracy,
        loss=msg.loss,
        up_budget_bits=msg.up_budget_bits,
        last_round_uplink_bits=msg.last_round_uplink_bits,
        total_uplink_bits=msg.total_uplink_bits,
        total_downlink_bits=msg.total_downlink_bits,
        workers=[worker_status_to_proto(w) for w in msg.workers],
        mode=msg.mode,
        model=model_info_to_proto(msg.model),
        aggregation_weights=msg.aggregation_weights,
        weights_source=msg.weights_source,
        llm_confidence=msg.llm_confidence,
        llm_reasoning=msg.llm_reasoning,
    )


def status_reply_from_proto(msg: pb.StatusReply) -> StatusReply:
    return StatusReply(
        round=msg.round,
        max_rounds=msg.max_rounds,
        state=msg.state,
        accuracy=msg.accuracy,
        loss=msg.loss,
        up_budget_bits=msg.up_budget_bits,
        last_round_uplink_bits=msg.last_round_uplink_bits,
        total_uplink_bits=msg.total_uplink_bits,
        total_downlink_bits=msg.total_downlink_bits,
        workers=tuple(worker_status_from_proto(w) for w in msg.workers),
        mode=msg.mode,
        model=model_info_from_proto(msg.model),
        aggregation_weights=dict(msg.aggregation_weights),
        weights_source=msg.weights_source,
        llm_confidence=msg.llm_confidence,
        llm_reasoning=msg.llm_reasoning,
    )


def status_request() -> pb.StatusRequest:
    return pb.StatusRequest()


def stop_request(reason: str) -> pb.StopRequest:
    return pb.StopRequest(reason=reason)


def stop_reply_to_proto(accepted: bool, round_id: int) -> pb.StopReply:
    return pb.StopReply(accepted=accepted, round=round_id)


def stop_reply_from_proto(msg: pb.StopReply) -> tuple[bool, int]:
    """(accepted, the last completed round)."""
    return bool(msg.accepted), int(msg.round)


def model_request() -> pb.ModelRequest:
    return pb.ModelRequest()


def model_chunk_to_proto(msg: ModelChunk) -> pb.ModelChunk:
    return pb.ModelChunk(round=msg.round, tensors=_chunks_to_proto(msg.tensors))


def model_chunk_from_proto(msg: pb.ModelChunk) -> ModelChunk:
    return ModelChunk(round=msg.round, tensors=_chunks_from_proto(msg.tensors))


# ---------------------------------------------------------------- envelopes

_T = TypeVar("_T")
_Converter = Callable[[Any], Any]

# oneof field name -> (domain type, to_proto, from_proto)
_WORKER_PAYLOADS: dict[str, tuple[type, _Converter, _Converter]] = {
    "hello": (Hello, hello_to_proto, hello_from_proto),
    "offer": (UploadOffer, upload_offer_to_proto, upload_offer_from_proto),
    "update": (UpdateChunk, update_chunk_to_proto, update_chunk_from_proto),
    "skip": (Skip, skip_to_proto, skip_from_proto),
    "eval": (EvalResult, eval_result_to_proto, eval_result_from_proto),
    "heartbeat": (Heartbeat, heartbeat_to_proto, heartbeat_from_proto),
}
_MASTER_PAYLOADS: dict[str, tuple[type, _Converter, _Converter]] = {
    "welcome": (Welcome, welcome_to_proto, welcome_from_proto),
    "round_start": (RoundStart, round_start_to_proto, round_start_from_proto),
    "decision": (Decision, decision_to_proto, decision_from_proto),
    "reset": (ResetReference, reset_reference_to_proto, reset_reference_from_proto),
    "shutdown": (Shutdown, shutdown_to_proto, shutdown_from_proto),
    "heartbeat": (Heartbeat, heartbeat_to_proto, heartbeat_from_proto),
}


def _wrap(
    envelope: type[_T], table: dict[str, tuple[type, _Converter, _Converter]], msg: object
) -> _T:
    for field_name, (domain_type, to_proto, _) in table.items():
        if type(msg) is domain_type:
            return envelope(**{field_name: to_proto(msg)})
    raise TypeError(f"cannot send {type(msg).__name__} in {envelope.__name__}")


def _unwrap(table: dict[str, tuple[type, _Converter, _Converter]], envelope: Any, what: str) -> Any:
    field_name = envelope.WhichOneof("payload")
    if field_name is None:
        raise WireError(f"{what}.payload: empty, expected one of {sorted(table)}")
    return table[field_name][2](getattr(envelope, field_name))


def worker_message_to_proto(msg: WorkerMessage) -> pb.WorkerMessage:
    return _wrap(pb.WorkerMessage, _WORKER_PAYLOADS, msg)


def worker_message_from_proto(msg: pb.WorkerMessage) -> WorkerMessage:
    result: WorkerMessage = _unwrap(_WORKER_PAYLOADS, msg, "worker_message")
    return result


def master_message_to_proto(msg: MasterMessage) -> pb.MasterMessage:
    return _wrap(pb.MasterMessage, _MASTER_PAYLOADS, msg)


def master_message_from_proto(msg: pb.MasterMessage) -> MasterMessage:
    result: MasterMessage = _unwrap(_MASTER_PAYLOADS, msg, "master_message")
    return result

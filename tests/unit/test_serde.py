"""serde: every message survives domain -> proto -> bytes -> proto -> domain unchanged, and
structurally bad input is refused with an error naming the field."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flq import serde
from flq.codec import Codec
from flq.codec.chunks import MAX_CHUNK_BYTES, TensorChunk
from flq.pb import flq_pb2 as pb
from flq.types import (
    PROTOCOL_VERSION,
    Decision,
    DeviceInfo,
    EvalResult,
    Heartbeat,
    Hello,
    Location,
    ModelChunk,
    ModelIdentity,
    ResetReference,
    RoundConfig,
    RoundStart,
    Shutdown,
    Skip,
    StatusReply,
    UpdateChunk,
    UploadOffer,
    Welcome,
    WorkerStatus,
)

CHUNK = TensorChunk(
    tensor_index=1,
    tensor_count=3,
    shape=(4, 5),
    dtype="float32",
    codec=Codec.LAQ_GRID,
    bits=4,
    scales=(0.25,),
    chunk_index=0,
    chunk_count=2,
    data=bytes(range(10)),
)

WORKER_MESSAGES = [
    Hello(
        worker_id="w3",
        protocol_version=PROTOCOL_VERSION,
        num_samples=450,
        device=DeviceInfo("orin-1", "Linux-aarch64", "cuda:Orin", 8192, "3.10.12", "0.1.0"),
        location=Location(latitude=48.1, longitude=11.5, site="lab-2"),
        upload_ref_version=7,
        download_ref_version=9,
        features={"traffic_mbps": 3.5, "battery": 0.25},
        model=ModelIdentity("0123456789abcdef", "Sequential: Flatten, Dense x2; 4,810 parameters"),
    ),
    Hello(worker_id="w4", protocol_version=1, num_samples=0, location=Location(site="field")),
    UploadOffer(
        round=5,
        wants_upload=True,
        cost_bits=123456,
        energy=0.5,
        clock=2,
        forced=False,
        train_loss=1.25,
        num_samples=450,
        train_seconds=0.75,
    ),
    UpdateChunk(round=5, upload_ref_version=7, tensors=(CHUNK,)),
    Skip(round=5, reason="no data"),
    EvalResult(round=5, loss=0.4, accuracy=0.9, num_examples=100),
    Heartbeat(round=5, phase="training", unix_time=1.7e9),
]

MASTER_MESSAGES = [
    Welcome(
        worker_id="w3",
        protocol_version=1,
        session_id="abc",
        round=4,
        reset_references=True,
        upload_ref_version=0,
        download_ref_version=0,
    ),
    RoundStart(
        round=5,
        config=RoundConfig(mode="bin", b_up=1, b_down=8, thr_scale=0.5),
        lazy_scalar=0.125,
        download_ref_version=6,
        part=0,
        parts=2,
        tensors=(CHUNK, CHUNK),
    ),
    Decision(round=5, granted=False, reason="budget", upload_ref_version=7),
    ResetReference(
        round=5, reason="version mismatch", upload_ref_version=0, download_ref_version=0
    ),
    Shutdown(round=5, reason="master stopping", reconnect=True, reconnect_after_ms=500),
    Heartbeat(round=5, phase="idle", unix_time=1.7e9),
]


def _bytes_round_trip(msg: object, message_type: type) -> object:
    data = msg.SerializeToString()  # type: ignore[attr-defined]
    return message_type.FromString(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize("msg", WORKER_MESSAGES, ids=lambda m: type(m).__name__)
def test_worker_messages_round_trip(msg: object) -> None:
    wire = _bytes_round_trip(serde.worker_message_to_proto(msg), pb.WorkerMessage)  # type: ignore[arg-type]
    assert serde.worker_message_from_proto(wire) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", MASTER_MESSAGES, ids=lambda m: type(m).__name__)
def test_master_messages_round_trip(msg: object) -> None:
    wire = _bytes_round_trip(serde.master_message_to_proto(msg), pb.MasterMessage)  # type: ignore[arg-type]
    assert serde.master_message_from_proto(wire) == msg  # type: ignore[arg-type]


def test_admin_messages_round_trip() -> None:
    status = StatusReply(
        round=3,
        max_rounds=30,
        state="training",
        accuracy=0.8,
        loss=0.6,
        up_budget_bits=10**7,
        last_round_uplink_bits=12345,
        total_uplink_bits=99999,
        total_downlink_bits=88888,
        workers=(WorkerStatus("w0", True, 1.7e9, 400, 1000, 3, 1, 0),),
        mode="bbit",
        aggregation_weights={"w0": 0.25, "w1": 0.75},
        weights_source="fallback:timeout",
        llm_confidence=0.8,
        llm_reasoning="no answer within 10 s",
    )
    wire = _bytes_round_trip(serde.status_reply_to_proto(status), pb.StatusReply)
    assert serde.status_reply_from_proto(wire) == status  # type: ignore[arg-type]
    model = ModelChunk(round=3, tensors=(CHUNK,))
    wire = _bytes_round_trip(serde.model_chunk_to_proto(model), pb.ModelChunk)
    assert serde.model_chunk_from_proto(wire) == model  # type: ignore[arg-type]


def test_every_round_config_field_travels() -> None:
    # Every field set to a non-default value must come back: catches a field missing in the proto.
    changed = RoundConfig(
        mode="laq8",
        b_up=8,
        b_down=8,
        local_steps=0,
        local_epochs=3,
        batch_size=64,
        lr=0.5,
        l2=1e-4,
        prox_mu=0.01,
        thr_scale=2.0,
        lazy_d=5,
        lazy_ck=0.5,
        lazy_c=20,
        warmup=2,
        stochastic_rounding=True,
        error_feedback=False,
        deadline_ms=1234,
        optimizer="adam",
        bbit_block=256,
        density=0.0025,
        gap_code="golomb",
        sparse_scope="model",
    )
    assert all(
        getattr(changed, f) != getattr(RoundConfig(), f) for f in RoundConfig.__dataclass_fields__
    )
    assert serde.round_config_from_proto(serde.round_config_to_proto(changed)) == changed


@given(
    shape=st.lists(st.integers(0, 2**40), max_size=serde.MAX_TENSOR_DIMS).map(tuple),
    codec=st.sampled_from(list(Codec)),
    bits=st.integers(0, 64),
    scales=st.lists(
        st.floats(allow_nan=False, allow_infinity=False), max_size=serde.MAX_SCALES
    ).map(tuple),
    count=st.integers(1, 1000),
    data=st.binary(max_size=64),
)
def test_tensor_chunk_round_trip(
    shape: tuple[int, ...],
    codec: Codec,
    bits: int,
    scales: tuple[float, ...],
    count: int,
    data: bytes,
) -> None:
    chunk = TensorChunk(
        tensor_index=count - 1,
        tensor_count=count,
        shape=shape,
        dtype="float32",
        codec=codec,
        bits=bits,
        scales=scales,
        chunk_index=0,
        chunk_count=1,
        data=data,
    )
    wire = _bytes_round_trip(serde.tensor_chunk_to_proto(chunk), pb.TensorChunk)
    assert serde.tensor_chunk_from_proto(wire) == chunk  # type: ignore[arg-type]


def _chunk_proto(**changes: object) -> pb.TensorChunk:
    msg = serde.tensor_chunk_to_proto(CHUNK)
    for name, value in changes.items():
        if isinstance(value, list):
            msg.ClearField(name)
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"codec": 0}, "codec"),
        ({"codec": 99}, "codec"),
        ({"dtype": "float64"}, "dtype"),
        ({"shape": [1] * 9}, "shape"),
        ({"scales": [math.nan]}, "scales"),
        ({"scales": [math.inf]}, "scales"),
        ({"scales": [1.0] * 5}, "scales"),
        ({"tensor_count": 0}, "tensor_count"),
        ({"tensor_index": 3}, "tensor_index"),
        ({"chunk_count": 0}, "chunk_count"),
        ({"chunk_index": 2}, "chunk_index"),
        ({"data": bytes(MAX_CHUNK_BYTES + 1)}, "data"),
    ],
)
def test_bad_tensor_chunk_is_refused_naming_the_field(
    changes: dict[str, object], field: str
) -> None:
    with pytest.raises(serde.WireError, match=field):
        serde.tensor_chunk_from_proto(_chunk_proto(**changes))


def test_empty_oneof_is_refused() -> None:
    with pytest.raises(serde.WireError, match="payload: empty"):
        serde.worker_message_from_proto(pb.WorkerMessage())
    with pytest.raises(serde.WireError, match="payload: empty"):
        serde.master_message_from_proto(pb.MasterMessage())


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.WorkerMessage(hello=pb.Hello(worker_id="")), "worker_id"),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="x" * 200)), "worker_id"),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="bad\nid")), "worker_id"),
        (
            pb.WorkerMessage(
                hello=pb.Hello(
                    worker_id="w", location=pb.Location(has_coordinates=True, latitude=123.0)
                )
            ),
            "location",
        ),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="w", features={"x": math.inf})), "features"),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="w", features={"": 1.0})), "features"),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="w", features={"n" * 65: 1.0})), "features"),
        (
            pb.WorkerMessage(
                hello=pb.Hello(worker_id="w", features={f"f{i}": 1.0 for i in range(33)})
            ),
            "features",
        ),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="w", model_digest="xyz")), "model_digest"),
        (pb.WorkerMessage(hello=pb.Hello(worker_id="w", model_digest="a" * 65)), "model_digest"),
        (
            pb.WorkerMessage(hello=pb.Hello(worker_id="w", model_description="d" * 257)),
            "model_description",
        ),
        (pb.WorkerMessage(offer=pb.UploadOffer(energy=math.nan)), "offer.energy"),
        (pb.WorkerMessage(offer=pb.UploadOffer(energy=-1.0)), "offer.energy"),
        (pb.WorkerMessage(offer=pb.UploadOffer(train_loss=math.inf)), "offer.train_loss"),
        (pb.WorkerMessage(offer=pb.UploadOffer(train_seconds=math.nan)), "offer.train_seconds"),
        (pb.WorkerMessage(offer=pb.UploadOffer(train_seconds=-0.5)), "offer.train_seconds"),
        (pb.WorkerMessage(eval=pb.EvalResult(accuracy=1.5)), "eval.accuracy"),
        (pb.WorkerMessage(heartbeat=pb.Heartbeat(unix_time=math.nan)), "heartbeat.unix_time"),
    ],
)
def test_bad_worker_message_is_refused_naming_the_field(
    message: pb.WorkerMessage, field: str
) -> None:
    with pytest.raises(serde.WireError, match=field):
        serde.worker_message_from_proto(message)


def test_bad_round_start_is_refused() -> None:
    with pytest.raises(serde.WireError, match="part"):
        serde.master_message_from_proto(
            pb.MasterMessage(round_start=pb.RoundStart(part=2, parts=2))
        )
    bad_config = pb.RoundStart(parts=1, config=pb.RoundConfig(lr=math.nan))
    with pytest.raises(serde.WireError, match=r"config\.lr"):
        serde.master_message_from_proto(pb.MasterMessage(round_start=bad_config))


def test_sending_an_unknown_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="Welcome"):
        serde.worker_message_to_proto(MASTER_MESSAGES[0])  # type: ignore[arg-type]


def test_codec_registry_matches_proto_enum() -> None:
    assert {c.name for c in Codec} == {
        n.removeprefix("CODEC_") for n in pb.Codec.DESCRIPTOR.values_by_name
    } - {"UNSPECIFIED"}
    assert all(pb.Codec.Value(f"CODEC_{c.name}") == int(c) for c in Codec)

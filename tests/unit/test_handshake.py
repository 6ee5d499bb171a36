"""The hello check and reference reconciliation, and the Backoff a worker redials with."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from flq.codec import encode_float32
from flq.link import MODEL_MISMATCH, ProtocolViolation, ViolationCode
from flq.master.handshake import check_hello, reconcile_references, welcome_for
from flq.master.registry import Registry
from flq.master.state import AlgorithmSettings, MasterState
from flq.memlink import memory_link_pair
from flq.types import PROTOCOL_VERSION, Heartbeat, Hello, ModelIdentity
from flq.worker.connection import Backoff, final_error

SHAPES = [(4,), (2,)]


def _state() -> MasterState:
    state = MasterState([np.zeros(s, np.float32) for s in SHAPES], AlgorithmSettings(mode="fedavg"))
    state.downlink.prepare(state.weights)  # downlink version 1
    return state


def test_the_hello_check_names_what_is_wrong() -> None:
    good = Hello("w0", PROTOCOL_VERSION, 5)
    assert check_hello(good, "") is good and check_hello(good, "w0") is good
    cases = [
        (Heartbeat(0, "idle", 0.0), "", ViolationCode.FAILED_PRECONDITION, "got Heartbeat"),
        (good, "w1", ViolationCode.PERMISSION_DENIED, "'w0' differs"),
        (
            Hello("w0", PROTOCOL_VERSION + 1, 5),
            "",
            ViolationCode.UNIMPLEMENTED,
            f"version {PROTOCOL_VERSION + 1}",
        ),
    ]
    for message, session_id, code, text in cases:
        with pytest.raises(ProtocolViolation, match=text) as refused:
            check_hello(message, session_id)
        assert refused.value.code is code


def test_a_worker_with_another_model_is_refused_naming_both_models() -> None:
    master = ModelIdentity("aaaa000011112222", "Sequential: Flatten, Dense x2; 4,810 parameters")
    same = Hello("w0", PROTOCOL_VERSION, 5, model=master)
    assert check_hello(same, "", master) is same
    other = ModelIdentity("bbbb333344445555", "Sequential: Conv2D, Dense; 9,034 parameters")
    with pytest.raises(ProtocolViolation) as refused:
        check_hello(Hello("w0", PROTOCOL_VERSION, 5, model=other), "", master)
    assert refused.value.code is ViolationCode.FAILED_PRECONDITION
    reason = refused.value.reason
    assert reason.startswith(MODEL_MISMATCH) and "worker 'w0'" in reason
    assert str(other) in reason and str(master) in reason
    # A model without a Keras form (synthetic) on either side is not checked.
    assert check_hello(Hello("w0", PROTOCOL_VERSION, 5), "", master).model.digest == ""
    assert check_hello(Hello("w0", PROTOCOL_VERSION, 5, model=other), "", None).model == other
    # The worker reads that refusal as final: its model will not change by retrying.
    assert final_error(grpc.StatusCode.FAILED_PRECONDITION, reason) is not None
    assert final_error(grpc.StatusCode.FAILED_PRECONDITION, "reference version 3") is None


def test_a_worker_in_step_keeps_its_references() -> None:
    state = _state()
    record, _ = Registry().attach(Hello("w0", PROTOCOL_VERSION, 5), memory_link_pair("w0")[0])
    in_step = Hello("w0", PROTOCOL_VERSION, 5, upload_ref_version=0, download_ref_version=1)
    assert reconcile_references(in_step, record, state) is False
    assert record.download_version == 1
    welcome = welcome_for(in_step, "s1", state, reset=False)
    assert (welcome.upload_ref_version, welcome.download_ref_version) == (0, 1)


def test_a_worker_ahead_of_the_master_is_reset_on_both_sides() -> None:
    """After a master restart from an older checkpoint: the worker's upload reference moved on,
    the master's did not; both drop it, and a stale downlink gets a keyframe next round."""
    state = _state()
    state.store.apply_upload("w0", [encode_float32(np.ones(s, np.float32)) for s in SHAPES])
    assert state.store.version("w0") == 1
    record, _ = Registry().attach(Hello("w0", PROTOCOL_VERSION, 5), memory_link_pair("w0")[0])
    ahead = Hello("w0", PROTOCOL_VERSION, 5, upload_ref_version=3, download_ref_version=7)
    assert reconcile_references(ahead, record, state) is True
    assert state.store.version("w0") == 0 and state.store.contribution("w0") is None
    assert record.download_version == -1  # keyframe next round
    welcome = welcome_for(ahead, "s2", state, reset=True)
    assert welcome.reset_references and welcome.upload_ref_version == 0


def test_backoff_grows_to_its_cap_with_full_jitter() -> None:
    top = Backoff(base_s=0.5, cap_s=30.0, rand=lambda: 0.999)
    assert [round(top.delay(a), 2) for a in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        7.99,
        15.98,
        29.97,
        29.97,
    ]
    assert Backoff(rand=lambda: 0.0).delay(5) == 0.0  # full jitter: anywhere from zero
    assert 0.0 <= Backoff(rand=lambda: 0.999).after_serving() < 5.0  # a few seconds, not 30

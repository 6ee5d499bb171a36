"""Server optimizers against steps computed by hand (pseudo-gradient g = -A)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from flq.algorithm import OPTIMIZERS, make_server_optimizer


def _arrays(*values: float) -> list[np.ndarray]:
    return [np.array(values, dtype=np.float32)]


def test_avg_adds_the_aggregate_and_ignores_lr() -> None:
    new = make_server_optimizer("avg", lr=0.01).step(_arrays(1.0, 2.0), _arrays(0.5, -1.0))
    np.testing.assert_allclose(new[0], [1.5, 1.0])


def test_sgd_scales_the_aggregate() -> None:
    new = make_server_optimizer("sgd", lr=0.1).step(_arrays(1.0, 2.0), _arrays(0.5, -1.0))
    np.testing.assert_allclose(new[0], [1.05, 1.9], rtol=1e-6)


def test_momentum_first_two_steps_by_hand() -> None:
    opt = make_server_optimizer("momentum", lr=0.5)
    theta = opt.step(_arrays(1.0), _arrays(0.2))
    assert theta[0][0] == pytest.approx(1.0 + 0.5 * 0.2)  # m = A
    theta = opt.step(theta, _arrays(-0.1))
    assert theta[0][0] == pytest.approx(1.1 + 0.5 * (0.9 * 0.2 - 0.1))  # m = 0.9 m + A


def test_adam_first_two_steps_by_hand() -> None:
    lr, a1, a2 = 0.1, 0.5, -0.2
    opt = make_server_optimizer("adam", lr=lr)
    theta = opt.step(_arrays(1.0), _arrays(a1))
    # Step 1: g = -0.5, m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2:
    # theta = 1 - 0.1 * (-0.5) / (0.5 + 1e-8)
    assert theta[0][0] == pytest.approx(1.0 + lr * 0.5 / (0.5 + 1e-8), rel=1e-6)
    theta = opt.step(theta, _arrays(a2))
    g1, g2 = -a1, -a2
    m = 0.9 * (0.1 * g1) + 0.1 * g2
    v = 0.999 * (0.001 * g1**2) + 0.001 * g2**2
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.999**2)
    expected = 1.0 + lr * 0.5 / (0.5 + 1e-8) - lr * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert theta[0][0] == pytest.approx(expected, rel=1e-6)


def test_yogi_first_step_by_hand() -> None:
    opt = make_server_optimizer("yogi", lr=0.1, tau=1e-3)
    theta = opt.step(_arrays(1.0), _arrays(0.5))
    # g = -0.5; m = 0.1 g = -0.05; v0 = tau^2 = 1e-6 < g^2, so v = 1e-6 + 0.01 * 0.25
    v = 1e-6 + 0.01 * 0.25
    assert theta[0][0] == pytest.approx(1.0 + 0.1 * 0.05 / (math.sqrt(v) + 1e-3), rel=1e-5)


def test_yogi_shrinks_v_when_gradients_get_small() -> None:
    opt = make_server_optimizer("yogi", lr=0.1)
    theta = opt.step(_arrays(0.0), _arrays(1.0))
    opt.step(theta, _arrays(0.01))
    v = opt.state()["v"][0][0]
    v1 = 1e-6 + 0.01 * 1.0
    # v > g^2 now, so Yogi subtracts: v2 = v1 - 0.01 * 1e-4
    assert v == pytest.approx(v1 - 0.01 * 1e-4, rel=1e-5)


def test_adagrad_first_two_steps_by_hand() -> None:
    tau = 1e-3
    opt = make_server_optimizer("adagrad", lr=0.2, tau=tau)
    theta = opt.step(_arrays(1.0), _arrays(0.5))
    v1 = tau**2 + 0.25
    expected = 1.0 + 0.2 * 0.5 / (math.sqrt(v1) + tau)
    assert theta[0][0] == pytest.approx(expected, rel=1e-6)
    theta = opt.step(theta, _arrays(-0.3))
    v2 = v1 + 0.09
    assert theta[0][0] == pytest.approx(expected - 0.2 * 0.3 / (math.sqrt(v2) + tau), rel=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inputs_are_not_modified_and_state_round_trips(name: str) -> None:
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (4,)]
    theta = [rng.normal(size=s).astype(np.float32) for s in shapes]
    steps = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(5)]
    opt = make_server_optimizer(name, lr=0.05)
    for delta in steps[:3]:
        kept_theta, kept_delta = copy.deepcopy(theta), copy.deepcopy(delta)
        new = opt.step(theta, delta)
        for a, b in zip(theta + delta, kept_theta + kept_delta, strict=True):
            np.testing.assert_array_equal(a, b)
        theta = new
    restored = make_server_optimizer(name, lr=999.0)
    restored.load_state(copy.deepcopy(opt.state()))
    theta_a, theta_b = theta, [t.copy() for t in theta]
    for delta in steps[3:]:
        theta_a, theta_b = opt.step(theta_a, delta), restored.step(theta_b, delta)
    for a, b in zip(theta_a, theta_b, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_fresh_state_round_trips_and_names_are_checked() -> None:
    fresh = make_server_optimizer("adam", lr=0.1)
    state = fresh.state()
    state.pop("m")  # an empty list may not survive a checkpoint
    state.pop("v")
    restored = make_server_optimizer("adam", lr=0.1)
    restored.load_state(state)
    np.testing.assert_array_equal(
        fresh.step(_arrays(1.0), _arrays(0.5))[0], restored.step(_arrays(1.0), _arrays(0.5))[0]
    )
    with pytest.raises(ValueError, match="state is for"):
        make_server_optimizer("yogi", lr=0.1).load_state(fresh.state())
    with pytest.raises(ValueError, match="unknown server optimizer"):
        make_server_optimizer("adamw", lr=0.1)
    with pytest.raises(ValueError, match="shapes"):
        make_server_optimizer("sgd", lr=0.1).step(_arrays(1.0), _arrays(1.0, 2.0))

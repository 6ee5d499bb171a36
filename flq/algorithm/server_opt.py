"""Server optimizers: how the global model moves given the round's aggregate A.

A is already a descent direction (the weighted mean of model deltas), so the pseudo-gradient is
g = -A. `avg` adds A as is (FedAvg), `sgd` scales it by server_lr, `momentum` is heavy-ball SGD
on A (FedAvgM, Hsu et al. arXiv 1909.06335: m = 0.9 m + A, theta += server_lr * m); `adam`, `yogi`
and `adagrad` follow FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021):

    m = b1 m + (1 - b1) g
    adam:    v = b2 v + (1 - b2) g^2,   bias-corrected m_hat, v_hat, eps 1e-8
    yogi:    v = v - (1 - b2) g^2 sign(v - g^2)          (no bias correction, v starts at tau^2)
    adagrad: v = v + g^2                                  (no bias correction, v starts at tau^2)
    theta -= server_lr * m_hat / (sqrt(v_hat) + eps)      (eps = tau = 1e-3 for yogi/adagrad)

All arithmetic is float32, as the model is. Each optimizer checkpoints through state()/load_state().

A step is two moves: `propose` computes the new weights and optimizer state without changing
anything, `commit` adopts them. The master checks a proposal is finite before committing it, so an
overflow (a huge but finite update squared into Adam's v, say) can never reach the global model,
the optimizer's state or a checkpoint. `step` is propose-then-commit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, get_args

import numpy as np

from flq.algorithm._arrays import check_shapes, shapes_of

OptimizerName: TypeAlias = Literal["avg", "sgd", "momentum", "adam", "yogi", "adagrad"]
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)


@dataclass(frozen=True)
class Proposal:
    """A step not yet taken: the new weights and the optimizer state that would go with them."""

    weights: list[np.ndarray]
    state: tuple[Any, ...] = ()  # the optimizer's own: arrays and scalars, opaque to callers

    def finite(self) -> bool:
        """True when every weight and every array of the state is finite."""
        state = [a for part in self.state if isinstance(part, list) for a in part]
        arrays = [*self.weights, *state]
        return all(bool(np.all(np.isfinite(a))) for a in arrays)


class ServerOptimizer(Protocol):
    name: str

    def propose(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Proposal:
        """The step from `theta` along `delta`; nothing (theta, delta, the optimizer) changes."""
        ...

    def commit(self, proposal: Proposal) -> list[np.ndarray]:
        """Adopt a proposal's state; returns its weights."""
        ...

    def step(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        """New weights (fresh arrays): propose, then commit."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...


def _f32(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float32) for v in values]


class AverageOptimizer:
    """theta + A: plain FedAvg (server_lr is ignored)."""

    name: str = "avg"

    def propose(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Proposal:
        check_shapes(delta, shapes_of(theta), "aggregate")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to see
            return Proposal([t + d for t, d in zip(_f32(theta), _f32(delta), strict=True)])

    def commit(self, proposal: Proposal) -> list[np.ndarray]:
        return proposal.weights

    def step(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.commit(self.propose(theta, delta))

    def state(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state(self, state: Mapping[str, Any]) -> None:
        _check_name(self.name, state)


@dataclass
class SgdOptimizer:
    """theta + server_lr * A."""

    lr: float
    name: str = "sgd"

    def propose(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Proposal:
        check_shapes(delta, shapes_of(theta), "aggregate")
        lr = np.float32(self.lr)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to see
            return Proposal([t + lr * d for t, d in zip(_f32(theta), _f32(delta), strict=True)])

    def commit(self, proposal: Proposal) -> list[np.ndarray]:
        return proposal.weights

    def step(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.commit(self.propose(theta, delta))

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr}

    def load_state(self, state: Mapping[str, Any]) -> None:
        _check_name(self.name, state)
        self.lr = float(state["lr"])


@dataclass
class MomentumOptimizer:
    """theta + server_lr * m with m = beta m + A (heavy ball). Linear in A, so a sparse,
    error-fed aggregate moves the model by what its values say; Adam's per-coordinate
    normalisation turns a rare sparse hit into a step of ~30 lr whatever its size."""

    lr: float
    beta: float = 0.9
    name: str = "momentum"

    def __post_init__(self) -> None:
        self.m: list[np.ndarray] = []

    def propose(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Proposal:
        shapes = shapes_of(theta)
        check_shapes(delta, shapes, "aggregate")
        m_old = self.m or [np.zeros(s, np.float32) for s in shapes]
        check_shapes(m_old, shapes, "optimizer state")
        beta, lr = np.float32(self.beta), np.float32(self.lr)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to see
            new_m = [beta * m + d for m, d in zip(m_old, _f32(delta), strict=True)]
            new_theta = [t + lr * m for t, m in zip(_f32(theta), new_m, strict=True)]
        return Proposal(new_theta, (new_m,))

    def commit(self, proposal: Proposal) -> list[np.ndarray]:
        (self.m,) = proposal.state
        return proposal.weights

    def step(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.commit(self.propose(theta, delta))

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "m": [a.copy() for a in self.m]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        _check_name(self.name, state)
        self.lr = float(state["lr"])
        self.m = [np.array(a, np.float32) for a in state.get("m", [])]


def _adam_v(v: np.ndarray, g_sq: np.ndarray, b2: np.float32) -> np.ndarray:
    moved: np.ndarray = b2 * v + (1 - b2) * g_sq
    return moved


def _yogi_v(v: np.ndarray, g_sq: np.ndarray, b2: np.float32) -> np.ndarray:
    moved: np.ndarray = v - (1 - b2) * g_sq * np.sign(v - g_sq)
    return moved


def _adagrad_v(v: np.ndarray, g_sq: np.ndarray, b2: np.float32) -> np.ndarray:
    moved: np.ndarray = v + g_sq
    return moved


_SECOND_MOMENT: dict[str, Callable[[np.ndarray, np.ndarray, np.float32], np.ndarray]] = {
    "adam": _adam_v,
    "yogi": _yogi_v,
    "adagrad": _adagrad_v,
}


@dataclass
class AdaptiveOptimizer:
    """Adam / Yogi / Adagrad on the pseudo-gradient g = -A (see the module docstring)."""

    name: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    bias_correction: bool
    v_init: float  # v starts here on the first step (FedOpt: tau^2 for yogi/adagrad)

    def __post_init__(self) -> None:
        if self.name not in _SECOND_MOMENT:
            raise ValueError(f"no adaptive optimizer {self.name!r}")
        self.t = 0
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def propose(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Proposal:
        shapes = shapes_of(theta)
        check_shapes(delta, shapes, "aggregate")
        m_old = self.m or [np.zeros(s, np.float32) for s in shapes]
        v_old = self.v or [np.full(s, self.v_init, np.float32) for s in shapes]
        check_shapes(m_old, shapes, "optimizer state")
        t = self.t + 1
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        m_scale, v_scale = self._bias_corrections(t)
        update_v = _SECOND_MOMENT[self.name]
        new_theta, new_m, new_v = [], [], []
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to see
            for i, (w, d) in enumerate(zip(_f32(theta), _f32(delta), strict=True)):
                g = -d
                new_m.append(b1 * m_old[i] + (1 - b1) * g)
                new_v.append(update_v(v_old[i], g * g, b2))
                m_hat, v_hat = new_m[i] * m_scale, new_v[i] * v_scale
                new_theta.append(
                    w - np.float32(self.lr) * m_hat / (np.sqrt(v_hat) + np.float32(self.eps))
                )
        return Proposal(new_theta, (t, new_m, new_v))

    def commit(self, proposal: Proposal) -> list[np.ndarray]:
        self.t, self.m, self.v = proposal.state
        return proposal.weights

    def step(self, theta: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.commit(self.propose(theta, delta))

    def _bias_corrections(self, t: int) -> tuple[np.float32, np.float32]:
        if not self.bias_correction:
            return np.float32(1.0), np.float32(1.0)
        return (
            np.float32(1.0 / (1.0 - self.beta1**t)),
            np.float32(1.0 / (1.0 - self.beta2**t)),
        )

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "t": self.t,
            "m": [a.copy() for a in self.m],
            "v": [a.copy() for a in self.v],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        _check_name(self.name, state)
        self.lr = float(state["lr"])
        self.t = int(state["t"])
        # an empty list (no step taken yet) may come back from a checkpoint as missing
        self.m = [np.array(a, np.float32) for a in state.get("m", [])]
        self.v = [np.array(a, np.float32) for a in state.get("v", [])]


def _check_name(name: str, state: Mapping[str, Any]) -> None:
    if state.get("name") != name:
        raise ValueError(
            f"optimizer state is for {state.get('name')!r}, this optimizer is {name!r}"
        )


def make_server_optimizer(name: str, lr: float = 1.0, tau: float = 1e-3) -> ServerOptimizer:
    """The optimizer called `name`; `tau` is FedOpt's adaptivity for yogi and adagrad.
    Betas: momentum .9; adam .9/.999; yogi .9/.99 and adagrad momentum 0 (FedOpt's and
    Flower's defaults)."""
    if name == "avg":
        return AverageOptimizer()
    if name == "sgd":
        return SgdOptimizer(lr)
    if name == "momentum":
        return MomentumOptimizer(lr)
    if name == "adam":
        return AdaptiveOptimizer("adam", lr, 0.9, 0.999, 1e-8, True, 0.0)
    if name == "yogi":
        return AdaptiveOptimizer("yogi", lr, 0.9, 0.99, tau, False, tau * tau)
    if name == "adagrad":
        return AdaptiveOptimizer("adagrad", lr, 0.0, 0.0, tau, False, tau * tau)
    raise ValueError(f"unknown server optimizer {name!r}: expected one of {list(OPTIMIZERS)}")

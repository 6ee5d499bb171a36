"""A synthetic federated problem in pure numpy: linear regression split across workers.

For tests of the engine, the protocol and the transports, and for scale benchmarks with hundreds
of lightweight workers: no TensorFlow, deterministic by seed, and with a known optimum, so
"training works" is a checkable statement. Each worker's data comes from the same true weights,
shifted by a per-worker offset (non-IID), so lazy uploads and stale reuse have something to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from flq.config import Config
from flq.types import TrainResult, TrainSpec


@dataclass(frozen=True)
class SyntheticProblem:
    dim: int = 20
    samples_per_worker: int = 64
    noise: float = 0.05
    skew: float = 0.3
    seed: int = 0

    def true_weights(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 1]).normal(size=self.dim).astype(np.float32)

    def worker_data(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 2, index])
        x = rng.normal(size=(self.samples_per_worker, self.dim)).astype(np.float32)
        shift = self.skew * rng.normal(size=self.dim).astype(np.float32)
        y = x @ (self.true_weights() + shift) + self.noise * rng.normal(size=len(x))
        return x, y.astype(np.float32)

    def test_data(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 3])
        x = rng.normal(size=(512, self.dim)).astype(np.float32)
        return x, (x @ self.true_weights()).astype(np.float32)

    def initial_weights(self) -> list[np.ndarray]:
        return [np.zeros(self.dim, np.float32), np.zeros(1, np.float32)]


def _mse_and_grad(
    weights: list[np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, list[np.ndarray]]:
    w, b = weights
    residual = x @ w + b[0] - y
    loss = float(np.mean(residual**2))
    grad_w = (2.0 / len(x)) * (x.T @ residual)
    grad_b = np.array([2.0 * residual.mean()], np.float32)
    return loss, [grad_w.astype(np.float32), grad_b]


class SyntheticTrainer:
    """Minibatch SGD on one worker's share; `delay_s` stands in for slow hardware."""

    def __init__(self, problem: SyntheticProblem, index: int, delay_s: float = 0.0) -> None:
        self.x, self.y = problem.worker_data(index)
        self.rng = np.random.default_rng([problem.seed, 4, index])
        self.delay_s = delay_s

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> TrainResult:
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        current = [w.astype(np.float32).copy() for w in weights]
        steps = spec.local_steps or max(1, spec.local_epochs * len(self.y) // spec.batch_size)
        losses = []
        for _ in range(steps):
            batch = self.rng.choice(
                len(self.y), size=min(spec.batch_size, len(self.y)), replace=False
            )
            loss, grads = _mse_and_grad(current, self.x[batch], self.y[batch])
            losses.append(loss)
            current = [w - np.float32(spec.lr) * g for w, g in zip(current, grads, strict=True)]
        delta = [c - w for c, w in zip(current, weights, strict=True)]
        return TrainResult(
            delta=delta,
            loss=float(np.mean(losses)),
            num_samples=len(self.y),
            steps=steps,
            seconds=time.perf_counter() - started,
        )


class SyntheticEvaluation:
    """Scores weights on held-out data: loss is MSE, "accuracy" is R^2 clipped to [0, 1]."""

    def __init__(self, problem: SyntheticProblem) -> None:
        self.x, self.y = problem.test_data()
        self.initial_weights = problem.initial_weights()
        self.parameters = problem.dim + 1
        self._variance = float(np.var(self.y))

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        loss, _ = _mse_and_grad(weights, self.x, self.y)
        return loss, float(np.clip(1.0 - loss / self._variance, 0.0, 1.0))


def problem_for(cfg: Config) -> SyntheticProblem:
    """The problem every process of a `dataset.name = "synthetic"` federation shares."""
    return SyntheticProblem(seed=cfg.system.seed)

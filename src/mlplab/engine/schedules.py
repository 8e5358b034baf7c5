"""Learning-rate schedules: the rate at update step t (0-based), and the run length.

A schedule is a frozen dataclass with `total_steps(steps_per_epoch)`,
`eval_every(steps_per_epoch, evals_per_cycle)` and `rates(total_steps)`; its
arguments are checked when it is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlplab.engine import checks


@dataclass(frozen=True)
class Constant:
    """eta for `epochs` passes over the training data."""

    eta: float
    epochs: int

    def __post_init__(self):
        checks.non_negative("eta", self.eta)  # 0 freezes the weights: a test's tool
        checks.positive_int("epochs", self.epochs)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.epochs * steps_per_epoch

    def eval_every(self, steps_per_epoch: int, evals_per_cycle: int) -> int:
        return steps_per_epoch  # once per epoch, as the reports plot it

    def rates(self, total_steps: int) -> np.ndarray:
        return np.full(total_steps, self.eta)


@dataclass(frozen=True)
class Cyclical:
    """Triangular cyclical rate (Smith 2017).

    A cycle is 2 * n_s steps: the rate climbs linearly from eta_min to eta_max over
    n_s steps, then falls back. Training lasts `cycles` whole cycles.
    """

    eta_min: float
    eta_max: float
    n_s: int
    cycles: int

    def __post_init__(self):
        checks.non_negative("eta_min", self.eta_min)
        checks.positive("eta_max", self.eta_max)
        checks.require(self.eta_min <= self.eta_max, "eta_min", self.eta_min,
                       f"must be <= eta_max={self.eta_max!r}")
        checks.positive_int("n_s", self.n_s)
        checks.positive_int("cycles", self.cycles)

    def total_steps(self, steps_per_epoch: int) -> int:
        return 2 * self.n_s * self.cycles

    def eval_every(self, steps_per_epoch: int, evals_per_cycle: int) -> int:
        return max(1, (2 * self.n_s) // evals_per_cycle)

    def rates(self, total_steps: int) -> np.ndarray:
        t = np.arange(total_steps)
        phase = t % (2 * self.n_s)  # position inside the current cycle
        rising = phase < self.n_s
        frac = np.where(rising, phase, 2 * self.n_s - phase) / self.n_s
        return self.eta_min + frac * (self.eta_max - self.eta_min)


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up, then cosine decay (Loshchilov & Hutter 2017, without restarts).

    Over the first `warmup_epochs` the rate climbs linearly to eta (reaching it at the
    last warm-up step: no step at rate 0); over the rest it falls along half a cosine
    from eta towards eta_min. Warm-up keeps the first steps of adaptive or momentum
    optimisers small while their statistics are still poor. `epochs` in all,
    evaluated once per epoch like Constant.
    """

    eta: float
    epochs: int
    warmup_epochs: float = 0.0
    eta_min: float = 0.0

    def __post_init__(self):
        checks.positive("eta", self.eta)
        checks.positive_int("epochs", self.epochs)
        checks.non_negative("warmup_epochs", self.warmup_epochs)
        checks.require(self.warmup_epochs < self.epochs, "warmup_epochs",
                       self.warmup_epochs, f"must be < epochs={self.epochs!r}")
        checks.non_negative("eta_min", self.eta_min)
        checks.require(self.eta_min <= self.eta, "eta_min", self.eta_min,
                       f"must be <= eta={self.eta!r}")

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.epochs * steps_per_epoch

    def eval_every(self, steps_per_epoch: int, evals_per_cycle: int) -> int:
        return steps_per_epoch

    def rates(self, total_steps: int) -> np.ndarray:
        warmup = round(total_steps * self.warmup_epochs / self.epochs)
        t = np.arange(total_steps, dtype=np.float64)
        decay = (t - warmup) / max(1, total_steps - warmup)  # 0 .. <1 after warm-up
        rates = self.eta_min + (self.eta - self.eta_min) * 0.5 * (1 + np.cos(math.pi * decay))
        rates[:warmup] = self.eta * (t[:warmup] + 1) / warmup
        return rates


def half_cycle(n_s: int | None, n_s_k: float | None, n_train: int, batch_size: int) -> int:
    """n_s given directly, or as k * floor(n_train / batch_size) (k whole epochs)."""
    checks.require((n_s is None) != (n_s_k is None), "n_s", n_s,
                   f"set exactly one of n_s and n_s_k (n_s_k={n_s_k!r})")
    if n_s is not None:
        checks.positive_int("n_s", n_s)
        return int(n_s)
    checks.positive("n_s_k", n_s_k)
    return max(1, int(round(n_s_k * (n_train // batch_size))))

"""Learning-rate schedules: the rate at update step t (0-based), and the run length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Constant:
    """eta for `epochs` passes over the training data."""

    eta: float
    epochs: int

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


def half_cycle(n_s: int | None, n_s_k: float | None, n_train: int, batch_size: int) -> int:
    """n_s given directly, or as k * floor(n_train / batch_size) (k whole epochs)."""
    if n_s is not None:
        return int(n_s)
    return max(1, int(round(n_s_k * (n_train // batch_size))))

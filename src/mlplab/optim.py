"""Optimisers: how a gradient becomes an update of the parameters.

Each optimiser is a small dataclass with `step(params, grads, eta, lam)`: it updates
`params` (name -> array) in place from `grads` (same names and shapes), at rate `eta`.
Its state (velocities, moment estimates) is plain arrays beside the parameters,
name -> array, allocated on the first step and reused after. The gradients are
scratch space: a step overwrites them, which saves weight-sized temporaries (an
update of a 3072x1024 layer is several passes over 12 MB; every pass counts).

L2 regularisation `lam` applies to the weights only (the arrays whose name starts
with "W", see network.Network.weight_names), never to biases or batch-norm
parameters. It is the term lam * sum(W^2) of the cost the trainer reports, so every
optimiser follows its gradient 2 * lam * W:

- sgd: W <- (1 - 2 eta lam) W - eta g, the same update folded into a decay.
- momentum, adam: 2 * lam * W is added to the gradient before the velocity or the
  moment estimates see it (with adam it is then rescaled per entry like the rest).
- adamw: the same, plus its own `weight_decay`, decoupled from the gradient
  (Loshchilov & Hutter 2019): W <- W - eta * weight_decay * W, not rescaled. Use
  lam = 0 with adamw unless both are meant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mlplab import checks


def is_weight(name: str) -> bool:
    """Whether L2 (and adamw's decay) applies: the network names its weights W1, W2..."""
    return name[0] == "W"


@dataclass
class SGD:
    """Plain gradient descent: p <- p - eta * g (weights: g + 2 * lam * W)."""

    def step(self, params, grads, eta: float, lam: float) -> None:
        decay = 1.0 - 2.0 * eta * lam  # W - eta * (g + 2 lam W), without a temporary
        for name, g in grads.items():
            p = params[name]
            if lam and is_weight(name):
                p *= decay
            g *= eta
            p -= g


@dataclass
class Momentum:
    """Heavy ball: v <- momentum * v + g; p <- p - eta * v, v starting at 0.

    nesterov: p <- p - eta * (g + momentum * v) with the new v (the look-ahead form
    PyTorch uses). For weights g includes 2 * lam * W.
    """

    momentum: float = 0.9
    nesterov: bool = False
    velocity: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _scratch: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        checks.fraction("momentum", self.momentum)
        checks.require(isinstance(self.nesterov, bool), "nesterov", self.nesterov,
                       "must be true or false")

    def step(self, params, grads, eta: float, lam: float) -> None:
        if not self.velocity:
            self.velocity = _zeros_like(params, grads)
            self._scratch = _scratch_for(params)
        mu = self.momentum
        for name, g in grads.items():
            p, v, s = params[name], self.velocity[name], _view(self._scratch, g)
            if lam and is_weight(name):
                _add_l2(g, p, lam, s)
            v *= mu
            v += g
            if self.nesterov:
                np.multiply(v, mu * eta, out=s)
                g *= eta
                p -= g
                p -= s
            else:
                np.multiply(v, eta, out=g)
                p -= g


@dataclass
class Adam:
    """Adam (Kingma & Ba 2015) with bias correction; weight_decay > 0 makes it AdamW.

    At step t = 1, 2, ...: m <- beta1 m + (1 - beta1) g; v <- beta2 v + (1 - beta2) g^2;
    p <- p - eta * m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - beta1^t),
    v_hat = v / (1 - beta2^t). m and v start at 0. For weights g includes 2 * lam * W,
    and with weight_decay they first shrink: W <- (1 - eta * weight_decay) W.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    t: int = field(default=0, init=False)  # steps taken: the bias corrections' exponent
    m: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    v: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _scratch: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        checks.fraction("beta1", self.beta1)
        checks.fraction("beta2", self.beta2)
        checks.positive("eps", self.eps)
        checks.non_negative("weight_decay", self.weight_decay)

    def step(self, params, grads, eta: float, lam: float) -> None:
        if not self.m:
            self.m, self.v = _zeros_like(params, grads), _zeros_like(params, grads)
            self._scratch = _scratch_for(params)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        # eta m_hat / (sqrt(v_hat) + eps) = (eta r / bc1) m / (sqrt(v) + eps r) with
        # bc = 1 - beta^t, r = sqrt(bc2): one pass fewer than correcting v first
        r = math.sqrt(1.0 - b2 ** self.t)
        step_size = eta * r / (1.0 - b1 ** self.t)
        eps = self.eps * r
        shrink = 1.0 - eta * self.weight_decay
        for name, g in grads.items():
            p, m, v, s = params[name], self.m[name], self.v[name], _view(self._scratch, g)
            weight = is_weight(name)
            if lam and weight:
                _add_l2(g, p, lam, s)
            if self.weight_decay and weight:
                p *= shrink
            m *= b1
            np.multiply(g, 1.0 - b1, out=s)
            m += s
            v *= b2
            np.square(g, out=g)
            g *= 1.0 - b2
            v += g
            np.sqrt(v, out=g)
            g += eps
            np.divide(m, g, out=g)
            g *= step_size
            p -= g


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
ADAMW_WEIGHT_DECAY = 1e-2  # adamw's default decoupled decay, as in PyTorch
# settings each name accepts, beyond the learning rate (the schedule's) and lam
SETTINGS = {"sgd": (), "momentum": ("momentum", "nesterov"),
            "adam": ("beta1", "beta2", "eps"),
            "adamw": ("beta1", "beta2", "eps", "weight_decay")}


def make_optimizer(name: str, **settings):
    """The optimiser called `name` (one of OPTIMIZERS) with the given settings.

    Each takes only its own settings (SETTINGS[name]); "adamw" is Adam with a
    decoupled weight_decay, ADAMW_WEIGHT_DECAY unless given.
    """
    checks.one_of("optimizer", name, OPTIMIZERS)
    checks.settings_of("optimizer", name, settings, SETTINGS[name])
    if name == "sgd":
        return SGD()
    if name == "momentum":
        return Momentum(**settings)
    if name == "adamw":
        settings.setdefault("weight_decay", ADAMW_WEIGHT_DECAY)
    return Adam(**settings)


def _add_l2(g, p, lam: float, scratch) -> None:
    """g += 2 * lam * p, through a scratch array instead of a new temporary."""
    np.multiply(p, 2.0 * lam, out=scratch)
    g += scratch


def _zeros_like(params, grads) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(params[k]) for k in grads}


def _scratch_for(params) -> np.ndarray:
    """One flat buffer as large as the largest parameter, shared by all of them."""
    largest = max(params.values(), key=lambda p: p.size)
    return np.empty(largest.size, largest.dtype)


def _view(scratch: np.ndarray, like: np.ndarray) -> np.ndarray:
    return scratch[:like.size].reshape(like.shape)

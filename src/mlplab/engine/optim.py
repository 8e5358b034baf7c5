"""Optimisers: how a gradient becomes an update of the parameters.

Each optimiser is a small dataclass with `step(params, grads, eta, lam)`: it updates
`params` (name -> array) in place from `grads` (same names and shapes), at rate `eta`.
Its state (velocities, moment estimates) is plain arrays beside the parameters,
name -> array, allocated on the first step and reused after. The gradients are
scratch space: a step overwrites them, which saves weight-sized temporaries. The
stateful optimisers' passes run block by block (_blocks), so that a 3072x1024 layer's
several passes read its 12 MB arrays from memory about once.

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

from mlplab.engine import checks


def is_weight(name: str) -> bool:
    """Whether L2 (and adamw's decay) applies: the network names its weights W1, W2..."""
    return name[0] == "W"


@dataclass
class SGD:
    """Plain gradient descent: p <- p - eta * g (weights: g + 2 * lam * W)."""

    def step(self, params, grads, eta: float, lam: float) -> None:
        # whole arrays, not _blocks: 3 passes gain little from blocking, and the small
        # nets of the reports would pay its per-array cost (~1% of an epoch)
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
            weight = is_weight(name)
            for p, v, g_, s in _blocks(params[name], self.velocity[name], g,
                                           scratch=self._scratch):
                if lam and weight:
                    _add_l2(g_, p, lam, s)
                v *= mu
                v += g_
                if self.nesterov:
                    np.multiply(v, mu * eta, out=s)
                    g_ *= eta
                    p -= g_
                    p -= s
                else:
                    np.multiply(v, eta, out=g_)
                    p -= g_


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
            weight = is_weight(name)
            blocks = _blocks(params[name], self.m[name], self.v[name], g,
                             scratch=self._scratch)
            for p, m, v, g_, s in blocks:
                if lam and weight:
                    _add_l2(g_, p, lam, s)
                if self.weight_decay and weight:
                    p *= shrink
                m *= b1
                np.multiply(g_, 1.0 - b1, out=s)
                m += s
                v *= b2
                np.square(g_, out=g_)
                g_ *= 1.0 - b2
                v += g_
                np.sqrt(v, out=g_)
                g_ += eps
                np.divide(m, g_, out=g_)
                g_ *= step_size
                p -= g_


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
    """One flat buffer of a block, shared by all parameters."""
    largest = max(params.values(), key=lambda p: p.size)
    return np.empty(min(largest.size, BLOCK), largest.dtype)


BLOCK = 131_072  # elements (512 KB of float32): the arrays of a block stay in cache


def _blocks(*arrays, scratch=None) -> list:
    """Matching views of `arrays` (same shape), BLOCK elements at a time, with as large
    a view of `scratch` (flat, >= BLOCK) if given; an array of one block, or one that is
    not C-contiguous, whole.

    An optimiser's passes over a 3072x1024 layer would each stream ~12 MB per array
    from memory; block by block they all run on data in cache. The work is element-wise,
    so the result is the same bit for bit."""
    n = arrays[0].size
    if n <= BLOCK or not all(a.flags.c_contiguous for a in arrays):
        # whole: one block, or an array whose flat view would be a copy (the update
        # would be lost), which then gets a temporary scratch of its own
        if scratch is None:
            return [arrays]
        shape = arrays[0].shape
        s = scratch[:n].reshape(shape) if n <= BLOCK else np.empty(shape, scratch.dtype)
        return [(*arrays, s)]
    flat = [a.reshape(-1) for a in arrays]
    blocks = [[a[start:start + BLOCK] for a in flat] for start in range(0, n, BLOCK)]
    if scratch is not None:
        for views in blocks:
            views.append(scratch[:views[0].size])
    return blocks

"""Optimisers: one or two steps of each against values worked out by hand."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from mlplab.engine import checks, optim


def _one(value):
    return np.array([value])


def _step(opt, params, grads, eta=0.1, lam=0.0):
    """A step on copies of the gradients (a step uses them as scratch space)."""
    opt.step(params, {k: np.array(g, dtype=params[k].dtype) for k, g in grads.items()},
             eta, lam)


def _old_sgd_update(params, grads, eta, lam):
    """trainer.sgd_step's update before optimisers existed, copied verbatim."""
    decay = 1.0 - 2.0 * eta * lam  # W - eta * (g + 2 lam W), without a temporary
    for name, g in grads.items():
        p = params[name]
        if name[0] == "W" and lam:
            p *= decay
        g *= eta
        p -= g


def test_sgd_decays_weights_only_then_steps_against_the_gradient():
    params = {"W1": np.array([1.0, 2.0]), "b1": np.array([1.0, 2.0])}
    grads = {"W1": [0.5, -1.0], "b1": [0.5, -1.0]}
    _step(optim.SGD(), params, grads, eta=0.1, lam=0.5)
    # W: (1 - 2 * 0.1 * 0.5) W - 0.1 g;  b: b - 0.1 g
    np.testing.assert_allclose(params["W1"], [0.9 - 0.05, 1.8 + 0.1])
    np.testing.assert_allclose(params["b1"], [1.0 - 0.05, 2.0 + 0.1])


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_sgd_gives_the_old_update_bit_for_bit(lam):
    rng = np.random.default_rng(0)
    shapes = {"W1": (30, 20), "gamma1": (20,), "beta1": (20,), "W2": (20, 10), "b2": (10,)}
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    old = {k: v.copy() for k, v in params.items()}
    _old_sgd_update(old, {k: g.copy() for k, g in grads.items()}, 0.0123, lam)
    optim.SGD().step(params, grads, 0.0123, lam)
    for k in params:
        np.testing.assert_array_equal(params[k], old[k], err_msg=k)
        assert params[k].dtype == np.float32


def test_momentum_accumulates_a_velocity():
    opt, params = optim.Momentum(momentum=0.9), {"b1": _one(1.0)}
    _step(opt, params, {"b1": [1.0]})  # v = 1, p = 1 - 0.1
    np.testing.assert_allclose(params["b1"], [0.9])
    _step(opt, params, {"b1": [2.0]})  # v = 0.9 * 1 + 2 = 2.9, p = 0.9 - 0.29
    np.testing.assert_allclose(opt.velocity["b1"], [2.9])
    np.testing.assert_allclose(params["b1"], [0.61])


def test_nesterov_steps_along_the_gradient_plus_the_new_velocity():
    opt, params = optim.Momentum(momentum=0.9, nesterov=True), {"b1": _one(1.0)}
    _step(opt, params, {"b1": [1.0]})  # v = 1, p = 1 - 0.1 * (1 + 0.9 * 1)
    np.testing.assert_allclose(params["b1"], [0.81])
    _step(opt, params, {"b1": [2.0]})  # v = 2.9, p = 0.81 - 0.1 * (2 + 0.9 * 2.9)
    np.testing.assert_allclose(params["b1"], [0.349])


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_adds_the_l2_gradient_to_weights_before_the_velocity(nesterov):
    opt = optim.Momentum(momentum=0.5, nesterov=nesterov)
    params = {"W1": _one(1.0), "b1": _one(1.0)}
    _step(opt, params, {"W1": [1.0], "b1": [1.0]}, lam=0.5)
    # W: g = 1 + 2 * 0.5 * 1 = 2, v = 2; b: g = v = 1
    np.testing.assert_allclose(opt.velocity["W1"], [2.0])
    np.testing.assert_allclose(opt.velocity["b1"], [1.0])
    np.testing.assert_allclose(params["W1"], [1 - 0.1 * (2 + (0.5 * 2 if nesterov else 0))])


def _adam_by_hand(p, gs, eta, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    m = v = 0.0
    for t, g in enumerate(gs, start=1):
        p *= 1 - eta * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p -= eta * m_hat / (math.sqrt(v_hat) + eps)
    return p


def test_adam_corrects_the_bias_of_its_moments_at_steps_one_and_two():
    opt, params = optim.Adam(), {"b1": _one(1.0)}
    _step(opt, params, {"b1": [0.5]})
    # m = 0.05, v = 0.00025; m_hat = g and v_hat = g^2 at step 1: a step of ~eta * sign(g)
    assert opt.t == 1
    np.testing.assert_allclose(opt.m["b1"], [0.05])
    np.testing.assert_allclose(opt.v["b1"], [0.00025])
    p1 = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8)
    np.testing.assert_allclose(params["b1"], [p1], rtol=1e-12)
    _step(opt, params, {"b1": [-1.0]})
    # m = -0.055, v = 0.00124975; m_hat = -0.055 / 0.19, v_hat = 0.00124975 / 0.001999
    np.testing.assert_allclose(opt.m["b1"], [-0.055])
    np.testing.assert_allclose(opt.v["b1"], [0.00124975])
    m_hat, v_hat = -0.055 / 0.19, 0.00124975 / 0.001999
    np.testing.assert_allclose(params["b1"], [p1 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)],
                               rtol=1e-12)
    np.testing.assert_allclose(params["b1"], [_adam_by_hand(1.0, [0.5, -1.0], 0.1)],
                               rtol=1e-12)
    assert params["b1"][0] == pytest.approx(0.93661, abs=1e-5)


def test_adam_puts_l2_into_the_gradient_and_adamw_decays_weights_decoupled():
    adam, p_adam = optim.Adam(), {"W1": _one(1.0), "b1": _one(1.0)}
    _step(adam, p_adam, {"W1": [0.5], "b1": [0.5]}, lam=0.25)
    # W's gradient 0.5 + 2 * 0.25 * 1 = 1 is rescaled like any other: still eta * sign
    np.testing.assert_allclose(adam.m["W1"], [0.1])
    np.testing.assert_allclose(p_adam["W1"], [0.9], rtol=1e-7)

    adamw = optim.make_optimizer("adamw", weight_decay=0.5)
    p_w = {"W1": _one(1.0), "b1": _one(1.0)}
    for g in ([0.5], [-1.0]):
        _step(adamw, p_w, {"W1": g, "b1": g})
    np.testing.assert_allclose(p_w["W1"], [_adam_by_hand(1.0, [0.5, -1.0], 0.1, wd=0.5)],
                               rtol=1e-12)
    # biases are not decayed: plain Adam
    np.testing.assert_allclose(p_w["b1"], [_adam_by_hand(1.0, [0.5, -1.0], 0.1)], rtol=1e-12)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_state_is_allocated_once_and_float32_stays_float32(name):
    rng = np.random.default_rng(0)
    opt = optim.make_optimizer(name)
    params = {"W1": rng.standard_normal((6, 4), dtype=np.float32),
              "b1": np.zeros(4, np.float32)}
    _step(opt, params, {"W1": np.ones((6, 4)), "b1": np.ones(4)}, lam=0.1)
    state = [a for d in vars(opt).values() if isinstance(d, dict) for a in d.values()]
    _step(opt, params, {"W1": np.ones((6, 4)), "b1": np.ones(4)}, lam=0.1)
    after = [a for d in vars(opt).values() if isinstance(d, dict) for a in d.values()]
    assert all(a is b for a, b in zip(state, after, strict=True))
    assert all(p.dtype == np.float32 for p in params.values())
    assert all(a.dtype == np.float32 for a in after)


@pytest.mark.parametrize("name, settings", [(n, {}) for n in optim.OPTIMIZERS] +
                         [("momentum", {"nesterov": True})])
def test_block_by_block_update_equals_the_whole_array_update_bit_for_bit(
        name, settings, monkeypatch):
    rng = np.random.default_rng(1)
    shapes = {"W1": (3, optim.BLOCK + 5), "b1": (optim.BLOCK + 5,), "W2": (7, 3)}
    start = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
             for _ in range(2)]

    def two_steps(layout=np.ascontiguousarray):
        opt = optim.make_optimizer(name, **settings)
        params = {k: layout(v.copy()) for k, v in start.items()}
        for g in grads:
            opt.step(params, {k: layout(v.copy()) for k, v in g.items()}, 0.05, 1e-3)
        return params

    blocked = two_steps()  # W1 and b1 span 4 and 2 blocks
    # W1 in Fortran order: its flat view would be a copy, so it is updated whole
    fortran = two_steps(np.asfortranarray)
    monkeypatch.setattr(optim, "BLOCK", 10 * optim.BLOCK)
    whole = two_steps()  # one block each: every pass over the whole array
    for k in shapes:
        np.testing.assert_array_equal(blocked[k], whole[k], err_msg=k)
        np.testing.assert_array_equal(fortran[k], whole[k], err_msg=k)
        assert not np.array_equal(blocked[k], start[k])


def test_make_optimizer_builds_each_name_with_its_own_settings():
    assert isinstance(optim.make_optimizer("sgd"), optim.SGD)
    mom = optim.make_optimizer("momentum", momentum=0.8, nesterov=True)
    assert (mom.momentum, mom.nesterov) == (0.8, True)
    assert optim.make_optimizer("adam").weight_decay == 0.0
    assert optim.make_optimizer("adamw").weight_decay == optim.ADAMW_WEIGHT_DECAY


@pytest.mark.parametrize("call, message", [
    (lambda: optim.make_optimizer("rmsprop"), "optimizer='rmsprop': allowed ('sgd', "),
    (lambda: optim.make_optimizer("sgd", momentum=0.9),
     "momentum=0.9: not a setting of optimizer 'sgd'"),
    (lambda: optim.make_optimizer("adam", weight_decay=0.1),
     "weight_decay=0.1: not a setting of optimizer 'adam'"),
    (lambda: optim.Momentum(momentum=1.2), "momentum=1.2: must be in [0, 1)"),
    (lambda: optim.Momentum(momentum=-0.1), "momentum=-0.1: must be in [0, 1)"),
    (lambda: optim.Momentum(nesterov="yes"), "nesterov='yes'"),
    (lambda: optim.Adam(beta1=1.0), "beta1=1.0: must be in [0, 1)"),
    (lambda: optim.Adam(beta2=1.5), "beta2=1.5: must be in [0, 1)"),
    (lambda: optim.Adam(eps=0.0), "eps=0.0: must be finite and > 0"),
    (lambda: optim.make_optimizer("adamw", weight_decay=-1.0), "weight_decay=-1.0"),
])
def test_bad_settings_raise_argument_error_naming_the_argument(call, message):
    with pytest.raises(checks.ArgumentError, match=re.escape(message)):
        call()

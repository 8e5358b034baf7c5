"""Layer forward/backward pairs on small shapes."""

from __future__ import annotations

import numpy as np
import pytest

from mlplab import layers


def test_affine_forward_is_xW_plus_b_and_backward_returns_the_three_gradients():
    rng = np.random.default_rng(0)
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 2)), rng.normal(size=2)
    out, cache = layers.affine_forward(x, W, b)
    np.testing.assert_allclose(out, x @ W + b)
    dout = rng.normal(size=(4, 2))
    dx, dW, db = layers.affine_backward(dout, cache)
    assert dx.shape == x.shape and dW.shape == W.shape and db.shape == b.shape
    np.testing.assert_allclose(dx, dout @ W.T)
    np.testing.assert_allclose(dW, x.T @ dout)
    np.testing.assert_allclose(db, dout.sum(axis=0))


def test_affine_backward_skips_the_input_gradient_when_not_needed():
    x, W = np.ones((2, 3)), np.ones((3, 4))
    _, cache = layers.affine_forward(x, W)
    dx, dW, _ = layers.affine_backward(np.ones((2, 4)), cache, need_dx=False)
    assert dx is None and dW.shape == (3, 4)


def test_relu_passes_gradient_only_where_the_unit_was_on():
    x = np.array([[-1.0, 0.0, 2.0]])
    out, cache = layers.relu_forward(x.copy())
    np.testing.assert_array_equal(out, [[0, 0, 2]])
    np.testing.assert_array_equal(layers.relu_backward(np.ones((1, 3)), cache), [[0, 0, 1]])


def test_batchnorm_training_output_has_zero_mean_unit_variance_then_scale_and_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 5.0, size=(64, 4))
    gamma, beta = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.0, -1.0, 3.0, 0.0])
    out, _ = layers.batchnorm_forward(x, gamma, beta, train=True)
    np.testing.assert_allclose(out.mean(axis=0), beta, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), gamma, rtol=1e-3)


def test_batchnorm_moves_running_averages_in_training_and_uses_them_at_evaluation():
    x = np.random.default_rng(2).normal(10.0, 2.0, size=(50, 3))
    mean, var = np.zeros(3), np.ones(3)
    ones, zeros = np.ones(3), np.zeros(3)
    layers.batchnorm_forward(x, ones, zeros, train=True, running_mean=mean, running_var=var,
                             momentum=0.9)
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=0))
    np.testing.assert_allclose(var, 0.9 + 0.1 * x.var(axis=0))
    out, cache = layers.batchnorm_forward(x, ones, zeros, train=False, running_mean=mean,
                                          running_var=var)
    assert cache is None
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + layers.BN_EPS))


def test_batchnorm_backward_input_gradient_is_blind_to_a_shift_of_the_batch():
    # The mean subtraction makes the output blind to a shift of the whole column.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5))
    _, cache = layers.batchnorm_forward(x, np.ones(5), np.zeros(5), train=True)
    dx, dgamma, dbeta = layers.batchnorm_backward(rng.normal(size=(8, 5)), cache)
    np.testing.assert_allclose(dx.sum(axis=0), 0, atol=1e-12)
    assert dgamma.shape == dbeta.shape == (5,)


def test_softmax_cross_entropy_of_equal_scores_is_log_k_and_gradient_rows_sum_to_zero():
    scores = np.zeros((4, 10))
    loss, dscores = layers.softmax_cross_entropy(scores, np.array([0, 1, 2, 3]))
    assert loss == pytest.approx(np.log(10))
    np.testing.assert_allclose(dscores.sum(axis=1), 0, atol=1e-12)
    assert dscores[0, 0] == pytest.approx((0.1 - 1) / 4)


def test_softmax_cross_entropy_is_stable_for_huge_scores():
    scores = np.array([[1000.0, 1000.0], [-1000.0, 0.0]])
    loss, dscores = layers.softmax_cross_entropy(scores, np.array([0, 1]))
    assert loss == pytest.approx(np.log(2) / 2)
    np.testing.assert_allclose(dscores, [[-0.25, 0.25], [0, 0]], atol=1e-12)


def test_softmax_cross_entropy_stays_finite_when_the_correct_probability_underflows():
    # float32 exp underflows ~104 below the top score; the loss must stay the true ~200
    scores = np.array([[200.0, 0.0], [0.0, 0.0]], np.float32)
    loss, dscores = layers.softmax_cross_entropy(scores, np.array([1, 0]))
    assert loss == pytest.approx((200.0 + np.log(2)) / 2, rel=1e-5)
    np.testing.assert_allclose(dscores, [[0.5, -0.5], [-0.25, 0.25]], atol=1e-6)


def test_layers_keep_float32():
    x = np.ones((2, 3), np.float32)
    out, _ = layers.affine_forward(x, np.ones((3, 2), np.float32), np.zeros(2, np.float32))
    bn, _ = layers.batchnorm_forward(out, np.ones(2, np.float32), np.zeros(2, np.float32),
                                     train=True)
    assert out.dtype == bn.dtype == np.float32

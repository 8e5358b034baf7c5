"""Layer forward/backward pairs on small shapes."""

from __future__ import annotations

import numpy as np
import pytest

from mlplab.engine import layers


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


def test_dropout_keeps_units_at_rate_one_minus_p_and_scales_them_by_its_inverse():
    rng = np.random.default_rng(0)
    x = np.ones((200, 500), np.float32)
    out, (mask, scale) = layers.dropout_forward(x, 0.3, rng)
    assert out.dtype == np.float32 and scale == pytest.approx(1 / 0.7)
    assert np.mean(out == 0) == pytest.approx(0.3, abs=0.01)  # 100,000 draws
    np.testing.assert_allclose(out[mask], 1 / 0.7, rtol=1e-6)  # the forgotten-scale bug
    assert out.mean() == pytest.approx(1.0, abs=0.01)  # inverted: expectation unchanged


def test_dropout_with_a_given_mask_and_its_backward_pass_only_kept_units_scaled():
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    mask = np.array([[True, False, True, False]])
    out, cache = layers.dropout_forward(x.copy(), 0.5, mask=mask)
    np.testing.assert_array_equal(out, [[2.0, 0.0, 6.0, 0.0]])
    np.testing.assert_array_equal(layers.dropout_backward(np.ones((1, 4)), cache),
                                  [[2.0, 0.0, 2.0, 0.0]])


def test_dropout_draws_its_mask_from_the_generator():
    x = np.ones((4, 50))
    a, _ = layers.dropout_forward(x.copy(), 0.5, np.random.default_rng(7))
    b, _ = layers.dropout_forward(x.copy(), 0.5, np.random.default_rng(7))
    c, _ = layers.dropout_forward(x.copy(), 0.5, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_label_smoothing_mixes_the_one_hot_target_with_the_uniform_one():
    # scores (ln 3, 0): softmax (3/4, 1/4); eps = 0.2, k = 2: target (0.9, 0.1)
    scores = np.array([[np.log(3.0), 0.0]])
    loss, dscores = layers.softmax_cross_entropy(scores, np.array([0]), label_smoothing=0.2)
    assert loss == pytest.approx(-(0.9 * np.log(0.75) + 0.1 * np.log(0.25)))
    np.testing.assert_allclose(dscores, [[0.75 - 0.9, 0.25 - 0.1]], atol=1e-15)


def test_label_smoothing_zero_gives_exactly_the_plain_cross_entropy():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(16, 10)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    plain = layers.softmax_cross_entropy(scores, y)
    zero = layers.softmax_cross_entropy(scores, y, label_smoothing=0.0)
    assert plain[0] == zero[0]
    np.testing.assert_array_equal(plain[1], zero[1])
    smoothed = layers.softmax_cross_entropy(scores, y, label_smoothing=0.1)
    assert smoothed[1].dtype == np.float32
    np.testing.assert_allclose(smoothed[1].sum(axis=1), 0, atol=1e-7)


def test_label_smoothing_outside_zero_to_one_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"label_smoothing=1.0: must be in \[0, 1\)"):
        layers.softmax_cross_entropy(np.zeros((1, 3)), np.array([0]), label_smoothing=1.0)

"""The k-layer network: shapes, initialisation, modes, persistence."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlplab.engine import network


def test_parameters_have_one_weight_per_layer_and_bn_replaces_hidden_biases():
    net = network.init_network(12, [5, 4], 3, bn=True, rng=0)
    assert set(net.params) == {"W1", "gamma1", "beta1", "W2", "gamma2", "beta2", "W3", "b3"}
    assert net.sizes == [12, 5, 4, 3]
    plain = network.init_network(12, [5, 4], 3, rng=0)
    assert set(plain.params) == {"W1", "b1", "W2", "b2", "W3", "b3"}


def test_empty_hidden_list_is_the_softmax_classifier():
    net = network.init_network(12, [], 10, rng=0)
    assert net.n_layers == 1 and net.params["W1"].shape == (12, 10)


@pytest.mark.parametrize("init, fan_in, expected_std", [
    ("he", 2000, np.sqrt(2 / 2000)), ("xavier", 2000, np.sqrt(1 / 2000)), ("normal", 2000, 1e-3)])
def test_initialisation_draws_weights_at_the_named_scale(init, fan_in, expected_std):
    net = network.init_network(fan_in, [200], 10, init=init, init_std=1e-3, rng=0)
    assert net.params["W1"].std() == pytest.approx(expected_std, rel=0.02)


def test_same_seed_same_weights_and_float32_by_default():
    a = network.init_network(8, [4], 3, rng=7)
    b = network.init_network(8, [4], 3, rng=7)
    np.testing.assert_array_equal(a.params["W1"], b.params["W1"])
    assert a.dtype == np.float32


def test_l2_penalty_counts_weights_only():
    net = network.init_network(3, [2], 2, rng=0)
    for p in net.params.values():
        p[...] = 1.0
    assert network.l2_penalty(net, 0.5) == pytest.approx(0.5 * (3 * 2 + 2 * 2))


def test_cost_gradient_includes_the_l2_term():
    rng = np.random.default_rng(0)
    net = network.init_network(6, [5], 3, rng=0, dtype=np.float64)
    X, y = rng.normal(size=(4, 6)), np.array([0, 1, 2, 0])
    _, _, g0 = network.cost_and_grads(net, X, y, lam=0.0)
    _, _, g1 = network.cost_and_grads(net, X, y, lam=0.3)
    np.testing.assert_allclose(g1["W1"] - g0["W1"], 0.6 * net.params["W1"])
    np.testing.assert_allclose(g1["b1"], g0["b1"])


def test_evaluation_with_bn_uses_running_averages_not_the_batch():
    rng = np.random.default_rng(1)
    net = network.init_network(6, [5], 3, bn=True, rng=0, dtype=np.float64)
    X = rng.normal(size=(20, 6))
    single = network.predict_scores(net, X[:1])
    batch = network.predict_scores(net, X)
    np.testing.assert_allclose(single[0], batch[0])  # a row's score ignores its batch


def test_save_and_load_round_trip_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(2)
    net = network.init_network(6, [5, 4], 3, bn=True, rng=0)
    X = rng.normal(size=(10, 6)).astype(np.float32)
    network.cost_and_grads(net, X, np.zeros(10, int), 0.0)  # moves the running stats
    network.save(net, tmp_path / "net.npz", mean=np.zeros(6))
    loaded, extra = network.load(tmp_path / "net.npz")
    np.testing.assert_array_equal(network.predict_scores(loaded, X),
                                  network.predict_scores(net, X))
    assert loaded.bn and loaded.n_layers == 3 and "mean" in extra


def test_dropout_is_one_rate_per_hidden_layer_from_a_number_or_a_list():
    assert network.init_network(6, [5, 4], 3, rng=0).dropout == (0.0, 0.0)
    assert network.init_network(6, [5, 4], 3, dropout=0.2, rng=0).dropout == (0.2, 0.2)
    net = network.init_network(6, [5, 4], 3, dropout=[0.1, 0.5], rng=0)
    assert net.dropout == (0.1, 0.5)
    assert net.arch == "6-5-4-3 +dropout 0.1/0.5"
    assert network.init_network(6, [], 3, dropout=0.5, rng=0).dropout == ()


def test_dropout_acts_in_training_only_and_evaluation_is_the_plain_network():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 6))
    net = network.init_network(6, [40, 30], 3, dropout=0.5, rng=0, dtype=np.float64)
    plain = network.Network(net.params, net.n_layers)
    np.testing.assert_array_equal(network.predict_scores(net, X),
                                  network.predict_scores(plain, X))
    train_scores, _ = network.forward(net, X, train=True)
    assert not np.allclose(train_scores, network.forward(plain, X, train=True)[0])


def test_dropout_masks_come_from_the_generator_or_repeat_for_a_seed():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20, 6))
    net = network.init_network(6, [40], 3, dropout=0.5, rng=0, dtype=np.float64)
    scores = lambda r: network.forward(net, X, train=True, dropout_rng=r)[0]  # noqa: E731
    np.testing.assert_array_equal(scores(5), scores(5))  # a seed: the same masks each call
    np.testing.assert_array_equal(network.forward(net, X, train=True)[0],
                                  scores(network.DROPOUT_SEED))
    gen = np.random.default_rng(5)
    assert not np.array_equal(scores(gen), scores(gen))  # a generator moves on
    np.testing.assert_array_equal(scores(np.random.default_rng(5)), scores(5))


def test_save_and_load_keep_the_dropout_rates(tmp_path):
    net = network.init_network(6, [5, 4], 3, dropout=[0.25, 0.0], rng=0)
    network.save(net, tmp_path / "net.npz")
    loaded, _ = network.load(tmp_path / "net.npz")
    assert loaded.dropout == (0.25, 0.0)


def test_a_file_saved_before_dropout_existed_loads_without_dropout(tmp_path):
    net = network.init_network(6, [5], 3, rng=0)
    arrays = {f"param/{k}": v for k, v in net.params.items()}
    np.savez(tmp_path / "old.npz", meta=np.array([2, 0, 0.9]), **arrays)
    loaded, _ = network.load(tmp_path / "old.npz")
    assert loaded.dropout == (0.0,) and loaded.n_layers == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": [5, 0]}, "hidden=[5, 0]: hidden sizes must be integers > 0"),
    ({"init": "glorot"}, "init='glorot': allowed ('he', 'xavier', 'normal')"),
    ({"init_std": 0.0}, "init_std=0.0: must be finite and > 0"),
    ({"bn_momentum": 1.0}, "bn_momentum=1.0: must be in [0, 1)"),
    ({"dropout": 1.0}, "dropout=1.0: must be in [0, 1)"),
    ({"dropout": -0.1}, "dropout=-0.1: must be in [0, 1)"),
    ({"dropout": [0.1]}, "dropout=[0.1]: needs one rate per hidden layer (2)"),
    ({"d_in": 0}, "d_in=0: must be an integer > 0"),
])
def test_bad_arguments_raise_argument_error_naming_the_argument(kwargs, message):
    args = {"d_in": 6, "hidden": [5, 4], "n_classes": 3} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        network.init_network(args.pop("d_in"), args.pop("hidden"), args.pop("n_classes"),
                             **args)

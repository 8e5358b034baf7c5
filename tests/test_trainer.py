"""The training loop: evaluation points, reproducibility, divergence."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlplab.engine import augment, checks, data, layers, network, optim, schedules, threads, trainer

from .test_optim import _old_sgd_update


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", n_val=300)


def _train(ds, seed=0, eta_max=0.1, cycles=1, bn=False, **kw):
    net = network.init_network(64, [20], 10, bn=bn, rng=seed)
    clr = schedules.Cyclical(1e-4, eta_max, n_s=50, cycles=cycles)
    return net, trainer.train(net, ds, clr, lam=1e-3, batch_size=20, rng=seed,
                              progress=False, **kw)


def test_training_learns_digits(digits):
    _, result = _train(digits, cycles=2, bn=True)
    assert result.final["val_acc"] > 0.85 and result.final["test_acc"] > 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_and_config_give_the_same_numbers(digits):
    _, a = _train(digits, seed=3)
    _, b = _train(digits, seed=3)
    assert a.history == b.history and a.final == b.final
    _, c = _train(digits, seed=4)
    assert c.final != a.final


def test_evaluation_points_are_spread_over_each_cycle_and_include_both_ends(digits):
    records = []
    _, result = _train(digits, cycles=2, on_eval=records.append)
    steps = [r["step"] for r in result.history]
    assert steps == list(range(0, 201, 10))  # 10 per cycle of 100 steps, plus step 0
    assert records == result.history
    assert {"lr", "train_loss", "train_cost", "train_acc", "val_loss", "val_cost",
            "val_acc"} <= set(records[0])


def test_the_training_curve_reads_the_same_evenly_spaced_rows_at_every_point(
        digits, monkeypatch):
    seen = []
    real = network.evaluate
    monkeypatch.setattr(network, "evaluate",
                        lambda net, X, y, lam: seen.append(X.copy()) or real(net, X, y, lam))
    net, result = _train(digits, eval_train_rows=100)
    n = len(digits.y_train)
    rows = np.arange(100) * n // 100
    assert len(np.unique(rows)) == 100 and rows[-1] > 0.98 * n  # spread to the end
    train_evals = seen[0::2][:len(result.history)]  # each point: train, then val
    assert all(np.array_equal(X, digits.X_train[rows]) for X in train_evals)
    assert all(len(X) == len(digits.y_val) for X in seen[1::2][:len(result.history)])
    expect = network.evaluate(net, digits.X_train[rows], digits.y_train[rows], 1e-3)
    assert result.final["train_acc"] == expect["acc"]


def test_a_training_split_smaller_than_the_subset_is_evaluated_whole(digits):
    _, whole = _train(digits, eval_train_rows=None)
    _, more = _train(digits, eval_train_rows=10**6)
    assert whole.history == more.history


def test_the_threads_each_phase_ran_with_are_read_back(digits):
    two = min(2, threads.available_cores())
    _, result = _train(digits, threads=two)  # a 64-20-10 step is too small for two
    assert result.extra["threads"] == {"update": 1, "eval": two}
    _, untouched = _train(digits)
    assert "threads" not in untouched.extra


def test_progress_is_reported_every_so_many_steps_and_can_stop_training(digits):
    # the app checks its tracking there: an error raised stops training at once
    seen = []

    def on_progress(step):
        seen.append(step)
        if step == 3 * trainer.PROGRESS_EVERY:
            raise RuntimeError("tracking failed")

    with pytest.raises(RuntimeError, match="tracking failed"):
        _train(digits, cycles=2, on_progress=on_progress)
    assert seen == [trainer.PROGRESS_EVERY * k for k in (1, 2, 3)]


def test_on_eval_stops_training_early_but_a_stop_at_the_last_step_is_a_complete_run(digits):
    _, cut = _train(digits, cycles=2, on_eval=lambda rec: rec["step"] == 50)
    assert (cut.steps, cut.stopped, cut.history[-1]["step"]) == (50, True, 50)
    # a pruner asked at the last evaluation: nothing was cut short
    _, full = _train(digits, cycles=2, on_eval=lambda rec: rec["step"] == 200)
    assert (full.steps, full.stopped) == (200, False)


def test_eval_steps_always_end_at_the_last_step():
    assert trainer.eval_steps(25, 10) == [0, 10, 20, 25]
    assert trainer.eval_steps(20, 10) == [0, 10, 20]


def test_exploding_learning_rate_raises_diverged_with_the_step(digits):
    with pytest.raises(trainer.Diverged, match="diverged at update step"):
        _train(digits, eta_max=1e6)


def test_one_pass_over_the_data_shuffles_every_epoch(digits, monkeypatch):
    net = network.init_network(64, [], 10, rng=0)
    const = schedules.Constant(eta=0.0, epochs=2)  # eta 0: weights never move
    seen = []
    original = trainer.sgd_step

    def spy(net, Xb, yb, eta, lam):
        seen.append(yb.copy())
        return original(net, Xb, yb, eta, lam)

    monkeypatch.setattr(trainer, "sgd_step", spy)
    trainer.train(net, digits, const, lam=0, batch_size=len(digits.y_train) // 2,
                  rng=0, progress=False)
    epoch1, epoch2 = np.concatenate(seen[:2]), np.concatenate(seen[2:])
    assert sorted(epoch1) == sorted(epoch2) and not np.array_equal(epoch1, epoch2)


@pytest.mark.parametrize("bn", [False, True])
def test_one_sgd_step_moves_every_parameter_by_minus_eta_times_the_checked_gradient(bn):
    # sgd_step fuses the L2 term into a weight decay; the gradient check covers
    # network.cost_and_grads, so the two must agree.
    rng = np.random.default_rng(0)
    net = network.init_network(12, [6, 5], 4, bn=bn, rng=0, dtype=np.float64)
    for name, p in net.params.items():
        if name[0] != "W":
            p += rng.normal(0, 0.1, p.shape)  # off their initial 0/1
    X, y = rng.normal(size=(8, 12)), rng.integers(0, 4, 8)
    before = {k: v.copy() for k, v in net.params.items()}
    _, _, grads = network.cost_and_grads(net, X, y, lam=0.3, update_stats=False)
    trainer.sgd_step(net, X, y, eta=0.05, lam=0.3)
    for name, p in net.params.items():
        np.testing.assert_allclose(p, before[name] - 0.05 * grads[name], rtol=1e-12,
                                   atol=1e-14, err_msg=name)


def _old_sgd_step(net, Xb, yb, eta, lam):
    """trainer.sgd_step before optimisers, dropout and smoothing existed."""
    scores, caches = network.forward(net, Xb, train=True)
    loss, dscores = layers.softmax_cross_entropy(scores, yb)
    _old_sgd_update(net.params, network.backward(net, dscores, caches), eta, lam)
    return loss


@pytest.mark.parametrize("bn", [False, True])
def test_the_default_path_gives_the_old_sgd_numbers_bit_for_bit(digits, monkeypatch, bn):
    net_new, new = _train(digits, seed=5, bn=bn)
    monkeypatch.setattr(trainer, "sgd_step", _old_sgd_step)
    net_old, old = _train(digits, seed=5, bn=bn)
    assert new.history == old.history and new.final == old.final
    for k in net_old.params:
        np.testing.assert_array_equal(net_new.params[k], net_old.params[k], err_msg=k)


TOOLBOX = {  # name: (train keyword arguments, dropout)
    "momentum": ({"optimizer": lambda: optim.make_optimizer("momentum")}, 0.0),
    "nesterov": ({"optimizer": lambda: optim.make_optimizer("momentum", nesterov=True)}, 0.0),
    "adam": ({"optimizer": lambda: optim.make_optimizer("adam")}, 0.0),
    "adamw": ({"optimizer": lambda: optim.make_optimizer("adamw")}, 0.0),
    "flip_translate": ({"augment": lambda: augment.FlipTranslate(2, image_shape=(8, 8, 1))},
                       0.0),
    "dropout": ({}, 0.3),
    "label_smoothing": ({"label_smoothing": lambda: 0.1}, 0.0),
    "everything": ({"optimizer": lambda: optim.make_optimizer("momentum"),
                    "augment": lambda: augment.FlipTranslate(1, image_shape=(8, 8, 1)),
                    "label_smoothing": lambda: 0.1}, 0.2),
}


def _train_with(ds, name, seed):
    options, dropout = TOOLBOX[name]
    net = network.init_network(64, [20, 20], 10, bn=True, dropout=dropout, rng=seed)
    result = trainer.train(net, ds, schedules.Constant(eta=0.01, epochs=1), lam=1e-3,
                           batch_size=100, rng=seed, progress=False,
                           **{k: make() for k, make in options.items()})
    return net, result


@pytest.mark.parametrize("name", list(TOOLBOX))
def test_each_option_trains_finite_and_the_same_seed_gives_the_same_numbers(digits, name):
    net_a, a = _train_with(digits, name, seed=1)
    net_b, b = _train_with(digits, name, seed=1)
    assert a.steps == len(digits.y_train) // 100
    assert all(np.isfinite(v) for rec in a.history for v in rec.values())
    assert a.history == b.history and a.final == b.final
    for k in net_a.params:
        np.testing.assert_array_equal(net_a.params[k], net_b.params[k], err_msg=k)
    _, c = _train_with(digits, name, seed=2)
    assert c.final != a.final


def test_dropout_and_augmentation_draw_apart_from_the_shuffles(digits, monkeypatch):
    # switching dropout or augmentation on must not change which rows make a batch
    original, batches = trainer.sgd_step, {}

    def spy(net, Xb, yb, *args, **kwargs):
        batches[name].append(yb.copy())
        return original(net, Xb, yb, *args, **kwargs)

    monkeypatch.setattr(trainer, "sgd_step", spy)
    for name in ("label_smoothing", "dropout", "everything"):  # the first draws nothing
        batches[name] = []
        _train_with(digits, name, seed=1)
    for name in ("dropout", "everything"):
        for a, b in zip(batches["label_smoothing"], batches[name], strict=True):
            np.testing.assert_array_equal(a, b)


def _recording_identity(seen):
    def augment(Xb, rng):
        seen.append((Xb.shape, rng.random()))
        return Xb
    return augment


def test_the_augmentation_sees_every_batch_with_a_stream_of_the_trainers_rng(digits):
    runs = [[], []]
    for seen in runs:
        trainer.train(network.init_network(64, [], 10, rng=0), digits,
                      schedules.Constant(eta=0.01, epochs=2), lam=0, batch_size=100, rng=0,
                      augment=_recording_identity(seen), progress=False)
    assert len(runs[0]) == 2 * (len(digits.y_train) // 100) and runs[0] == runs[1]
    assert all(shape == (100, 64) for shape, _ in runs[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"evals_per_cycle": 0}, "evals_per_cycle=0: must be an integer > 0"),
    ({"batch_size": 0}, "batch_size=0: must be between 1 and the"),
    ({"batch_size": 10**6}, "batch_size=1000000: must be between 1 and the"),
    ({"lam": -1.0}, "lam=-1.0: must be finite and >= 0"),
    ({"lam": float("nan")}, "lam=nan"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0: must be in [0, 1)"),
    ({"eval_train_rows": 0}, "eval_train_rows=0: must be an integer > 0"),
    ({"threads": 0}, "threads=0: must be an integer > 0"),
])
def test_bad_arguments_raise_argument_error_naming_the_argument(digits, kwargs, message):
    net = network.init_network(64, [], 10, rng=0)
    args = {"lam": 0.0, "batch_size": 20, "progress": False} | kwargs
    with pytest.raises(checks.ArgumentError, match=re.escape(message)):
        trainer.train(net, digits, schedules.Cyclical(1e-4, 0.1, 5, 1), **args)

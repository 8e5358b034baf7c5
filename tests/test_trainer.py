"""The training loop: evaluation points, reproducibility, divergence."""

from __future__ import annotations

import numpy as np
import pytest

from mlplab import data, network, schedules, trainer


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

"""Learning-rate schedules at the steps that define them."""

from __future__ import annotations

import numpy as np
import pytest

from mlplab import schedules


def test_cyclical_rate_is_min_at_cycle_starts_and_max_at_half_cycles():
    clr = schedules.Cyclical(eta_min=1e-5, eta_max=1e-1, n_s=500, cycles=2)
    rates = clr.rates(clr.total_steps(steps_per_epoch=100))
    assert len(rates) == 2000
    assert rates[0] == pytest.approx(1e-5)
    assert rates[250] == pytest.approx((1e-5 + 1e-1) / 2)
    assert rates[500] == pytest.approx(1e-1)
    assert rates[750] == pytest.approx((1e-5 + 1e-1) / 2)
    assert rates[1000] == pytest.approx(1e-5)
    assert rates[1500] == pytest.approx(1e-1)
    assert rates[1999] == pytest.approx(1e-5 + (1e-1 - 1e-5) / 500)


def test_cyclical_rate_changes_linearly_between_its_corners():
    clr = schedules.Cyclical(0.0, 1.0, n_s=4, cycles=1)
    np.testing.assert_allclose(clr.rates(8), [0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25])


def test_half_cycle_from_k_epochs_uses_the_floor_of_batches_per_epoch():
    assert schedules.half_cycle(None, 2, n_train=45_000, batch_size=100) == 900
    assert schedules.half_cycle(None, 5, n_train=45_050, batch_size=100) == 2250
    assert schedules.half_cycle(800, None, n_train=10_000, batch_size=100) == 800


def test_constant_schedule_lasts_its_epochs_and_evaluates_once_per_epoch():
    const = schedules.Constant(eta=0.01, epochs=40)
    assert const.total_steps(steps_per_epoch=100) == 4000
    assert const.eval_every(100, evals_per_cycle=10) == 100
    assert set(const.rates(7)) == {0.01}


def test_cyclical_schedule_evaluates_a_set_number_of_times_per_cycle():
    assert schedules.Cyclical(1e-5, 1e-1, 500, 1).eval_every(100, evals_per_cycle=10) == 100

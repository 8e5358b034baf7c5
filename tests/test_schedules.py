"""Learning-rate schedules at the steps that define them."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlplab.engine import checks, schedules


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


def test_cosine_warms_up_linearly_then_decays_along_half_a_cosine():
    cos = schedules.Cosine(eta=0.1, epochs=10, warmup_epochs=2, eta_min=0.0)
    assert cos.total_steps(steps_per_epoch=10) == 100
    assert cos.eval_every(10, evals_per_cycle=3) == 10  # once per epoch, like Constant
    rates = cos.rates(100)
    np.testing.assert_allclose(rates[:20], 0.1 * np.arange(1, 21) / 20)  # no step at 0
    assert rates[20] == pytest.approx(0.1)
    assert rates[60] == pytest.approx(0.05)  # half way through the decay
    assert np.all(np.diff(rates[20:]) < 0) and rates[-1] == pytest.approx(0.0, abs=1e-4)


def test_cosine_without_warmup_starts_at_eta_and_ends_near_eta_min():
    rates = schedules.Cosine(eta=1.0, epochs=1, eta_min=0.1).rates(4)
    np.testing.assert_allclose(rates, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.arange(4) / 4)))


@pytest.mark.parametrize("make, message", [
    (lambda: schedules.Constant(eta=-0.1, epochs=1), "eta=-0.1: must be finite and >= 0"),
    (lambda: schedules.Constant(eta=float("inf"), epochs=1), "eta=inf"),
    (lambda: schedules.Constant(eta=0.1, epochs=0), "epochs=0: must be an integer > 0"),
    (lambda: schedules.Constant(eta=0.1, epochs=2.5), "epochs=2.5: must be an integer > 0"),
    (lambda: schedules.Cyclical(1e-5, 0.0, 10, 1), "eta_max=0.0: must be finite and > 0"),
    (lambda: schedules.Cyclical(-1e-5, 0.1, 10, 1), "eta_min=-1e-05: must be finite and >= 0"),
    (lambda: schedules.Cyclical(0.2, 0.1, 10, 1), "eta_min=0.2: must be <= eta_max=0.1"),
    (lambda: schedules.Cyclical(1e-5, 0.1, 0, 1), "n_s=0: must be an integer > 0"),
    (lambda: schedules.Cyclical(1e-5, 0.1, 10, 0), "cycles=0: must be an integer > 0"),
    (lambda: schedules.Cosine(eta=0.0, epochs=5), "eta=0.0: must be finite and > 0"),
    (lambda: schedules.Cosine(eta=0.1, epochs=5, warmup_epochs=5),
     "warmup_epochs=5: must be < epochs=5"),
    (lambda: schedules.Cosine(eta=0.1, epochs=5, eta_min=0.2), "eta_min=0.2: must be <= eta"),
    (lambda: schedules.half_cycle(None, None, 100, 10), "set exactly one of n_s and n_s_k"),
    (lambda: schedules.half_cycle(5, 2.0, 100, 10), "set exactly one of n_s and n_s_k"),
    (lambda: schedules.half_cycle(0, None, 100, 10), "n_s=0: must be an integer > 0"),
    (lambda: schedules.half_cycle(None, -1.0, 100, 10), "n_s_k=-1.0: must be finite and > 0"),
])
def test_bad_arguments_raise_argument_error_naming_the_argument(make, message):
    with pytest.raises(checks.ArgumentError, match=re.escape(message)):
        make()

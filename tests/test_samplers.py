"""Samplers from hydra.sweeper.sampler: names, _target_ and arguments, the start-up rule."""

from __future__ import annotations

import logging

import optuna
import pytest

from hydra_plugins.mlplab_optuna_sweeper import _samplers
from hydra_plugins.mlplab_optuna_sweeper._studies import SeededPerTrial, trial_seed
from mlplab.config import ConfigError

TPE = "optuna.samplers.TPESampler"


def test_a_name_keeps_working_and_means_optunas_sampler():
    assert _samplers.spec("tpe") == {"_target_": TPE}
    assert isinstance(_samplers.make(_samplers.spec("random"), 0), optuna.samplers.RandomSampler)


def test_every_argument_of_the_sampler_reaches_optuna():
    args = {"n_startup_trials": 4, "multivariate": True, "constant_liar": True,
            "n_ei_candidates": 12}
    sampler = _samplers.make(_samplers.spec({"_target_": TPE, **args}), 0)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # Optuna keeps each argument as _<name>; a dropped one would keep its default
    assert {k: getattr(sampler, f"_{k}") for k in args} == args


@pytest.mark.parametrize("setting, key", [
    ("tpee", "hydra.sweeper.sampler"),
    ({"_target_": "optuna.samplers.NoSuchSampler"}, "hydra.sweeper.sampler._target_"),
    ({"_target_": "optuna.pruners.MedianPruner"}, "hydra.sweeper.sampler._target_"),
    ({"_target_": TPE, "seed": 3}, "hydra.sweeper.sampler.seed"),
    ({"_target_": TPE, "n_startup_trial": 3}, "hydra.sweeper.sampler.n_startup_trial"),
])
def test_a_bad_sampler_setting_is_a_config_error_naming_the_key(setting, key):
    with pytest.raises(ConfigError) as err:
        _samplers.make(_samplers.spec(setting), 0)
    assert err.value.key == key and str(err.value).startswith(key)


def test_a_stage_too_short_for_the_samplers_start_up_gets_a_third_of_its_trials(caplog):
    tpe = _samplers.spec("tpe")  # Optuna's default start-up: 10 trials
    with caplog.at_level(logging.INFO):
        assert _samplers.startup(tpe, 10, "0") == 3
    assert "stage 0: 10 trials" in caplog.text and "start-up is 3" in caplog.text
    assert _samplers.startup(tpe, 30, "0") == 10  # long enough: Optuna's own
    assert _samplers.startup(_samplers.spec("random"), 5, "0") is None  # no model


def test_a_start_up_the_user_set_that_covers_the_stage_is_refused():
    with pytest.raises(ConfigError, match="stage 1 has n_trials=8, so all of its trials"):
        _samplers.startup({"_target_": TPE, "n_startup_trials": 8}, 8, "1")
    assert _samplers.startup({"_target_": TPE, "n_startup_trials": 2}, 8, "1") == 2


def _draws(sampler_spec, n_startup, trials=6):
    """The lam each of `trials` trials draws on a toy objective, seeded per trial."""
    study = optuna.create_study(sampler=SeededPerTrial(
        lambda seed: _samplers.make(sampler_spec, seed, n_startup),
        lambda number: trial_seed(0, 0, number)))
    study.optimize(lambda t: -abs(t.suggest_float("lam", 1e-5, 1e-1, log=True) - 1e-3),
                   n_trials=trials)
    return [t.params["lam"] for t in study.trials]


def test_the_model_takes_over_after_the_start_up_and_draws_reproduce_from_the_seed():
    tpe, random = _draws(_samplers.spec("tpe"), 2), _draws(_samplers.spec("random"), None)
    assert tpe[:2] == random[:2], "the start-up draws at random, from the same seed"
    assert tpe[2:] != random[2:], "then the model draws"
    assert _draws(_samplers.spec("tpe"), 2) == tpe

"""Samplers from hydra.sweeper.sampler: names, _target_ and arguments, the start-up rule."""

from __future__ import annotations

import logging
import re
import time

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.mlplab_optuna_sweeper import _samplers
from hydra_plugins.mlplab_optuna_sweeper._rules import trial_seed
from hydra_plugins.mlplab_optuna_sweeper._studies import SeededPerTrial
from mlplab.app import optuna_storage
from mlplab.app.config import ConfigError

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
    assert "stage 0 has n_trials=10" in caplog.text and "start-up is 3" in caplog.text
    assert _samplers.startup(tpe, 30, "0") == 10  # long enough: Optuna's own
    assert _samplers.startup(_samplers.spec("random"), 5, "0") is None  # no model


def test_a_start_up_the_user_set_that_covers_the_stage_is_refused():
    with pytest.raises(ConfigError, match="stage 1 has n_trials=8, so all of them would be"):
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


# --- Hyperband's brackets and the start-up --------------------------------------------

def test_under_hyperband_the_start_up_fits_the_smallest_bracket_a_sampler_sees():
    from hydra_plugins.mlplab_optuna_sweeper import _pruning

    settings = {"name": "hyperband", "min_resource": 450, "max_resource": 2700,
                "reduction_factor": 3}
    assert _pruning.bracket_share(settings) == 2 / 5  # Optuna's budgets 3 and 2
    # a 10-trial stage: about 4 trials in the smaller bracket, so TPE's start-up of 5
    # would cover it; 3 leaves the model one
    tpe = _samplers.spec({"_target_": TPE, "n_startup_trials": 5})
    with pytest.raises(ConfigError, match="about 4 in Hyperband's smallest bracket"):
        _samplers.startup(tpe, 10, "0", 2 / 5)
    assert _samplers.startup({**tpe, "n_startup_trials": 3}, 10, "0", 2 / 5) == 3
    assert _pruning.bracket_share({"name": "median"}) == 1.0
    target = {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 450,
              "max_resource": 2700}  # Optuna's default reduction_factor, 3
    assert _pruning.bracket_share(target) == 2 / 5


def test_a_pruner_given_as_target_and_arguments_reaches_optuna_as_the_jobs_build_it(caplog):
    from hydra_plugins.mlplab_optuna_sweeper import _pruning
    from mlplab.trial import make_pruner

    setting = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2,
               "n_warmup_steps": 100, "interval_steps": 3, "n_min_trials": 2}
    stored = _pruning.describe(setting, None)
    pruner = make_pruner(stored)  # what a job rebuilds from the study's attribute
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps, pruner._interval_steps,
            pruner._n_min_trials) == (2, 100, 3, 2)
    assert _pruning.kind(stored) == "median" and _pruning.prunes(stored)
    assert not _pruning.prunes(_pruning.describe(
        {"_target_": "optuna.pruners.NopPruner"}, None))
    for bad, key in [({**setting, "n_startup": 1}, "hydra.sweeper.pruner.n_startup"),
                     ({**setting, "n_startup_trials": -1}, "hydra.sweeper.pruner"),
                     ({"_target_": TPE}, "hydra.sweeper.pruner._target_"),
                     ({"n_startup_trials": 1}, "hydra.sweeper.pruner._target_"),
                     (None, "hydra.sweeper.pruner"), (3, "hydra.sweeper.pruner")]:
        with pytest.raises(ConfigError) as err:
            _pruning.describe(bad, None)
        assert err.value.key == key, err.value
    # knobs of hydra.sweeper.pruning set beside _target_ do not apply: said
    from omegaconf import OmegaConf

    from hydra_plugins.mlplab_optuna_sweeper.config import PruningConf

    knobs = OmegaConf.merge(OmegaConf.structured(PruningConf), {"n_warmup_steps": 540})
    _pruning.describe(setting, knobs)
    assert "hydra.sweeper.pruning's ['n_warmup_steps']" in caplog.text


# --- several objectives: the front and the rule that picks from it --------------------

# --- settings refused before a search starts ------------------------------------------

def test_a_sampler_whose_packages_are_missing_is_refused_not_left_to_fail_after_its_start_up():
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed here: GPSampler can run")
    with pytest.raises(ConfigError, match=r"GPSampler needs \['torch'"):
        _samplers.spec("gp")


@pytest.mark.parametrize("setting, message", [
    ({"direction": 1}, "hydra.sweeper.direction=1: allowed ('maximize', 'minimize')"),
    ({"direction": ["maximize", "up"]}, "direction=['maximize', 'up']: allowed"),
    ({"objectives": ["n_params"], "direction": "minimize", "pruner": "hyperband"},
     "pruner='hyperband': with objectives=['n_params'] a trial reports its val_acc"),
    ({"direction": ["maximize", "minimize"], "objectives": ["val_acc", "n_params"],
      "stages": [{"n_trials": 3}, {"n_trials": 3}]}, "stages=2: with several objectives"),
])
def test_settings_the_sweeper_cannot_honour_are_refused_with_the_key_and_what_is_allowed(
        setting, message):
    from omegaconf import OmegaConf

    from hydra_plugins.mlplab_optuna_sweeper._settings import check
    from hydra_plugins.mlplab_optuna_sweeper.config import MlplabOptunaSweeperConf

    s = OmegaConf.merge(OmegaConf.structured(MlplabOptunaSweeperConf), setting)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(s)


def test_a_warm_point_must_be_a_point_of_the_space_integers_and_steps_included():
    from hydra_plugins.mlplab_optuna_sweeper import _space

    params, _ = _space.parse(["n=int(interval(8, 64))", "x=range(0.1, 1, 0.2)"])
    assert _space.inside(params, {"n": 10, "x": 0.5})
    assert not _space.inside(params, {"n": 10.5, "x": 0.5})  # not an int
    assert not _space.inside(params, {"n": 10, "x": 0.4})  # off the 0.2 grid
    with pytest.raises(ConfigError, match=r"warm_start\[0\]\.n=10.5: allowed an int in"):
        _space.warm_points(params, [{"n": 10.5, "x": 0.5}], "hydra.sweeper.warm_start")


def test_a_worker_waits_for_the_creators_set_up_and_carried_trials_do_not_end_the_wait(
        monkeypatch, caplog):
    from hydra_plugins.mlplab_optuna_sweeper import _studies

    monkeypatch.setattr(_studies, "READY_WAIT_SECONDS", 0.5)
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        params={}, distributions={}, value=0.5, user_attrs={_studies.CARRIED: "stage0"}))
    with caplog.at_level(logging.WARNING):
        _studies.wait_until_ready(study)  # only a carried trial: not set up yet
    assert "did not finish setting it up" in caplog.text
    caplog.clear()
    study.set_user_attr(_studies.READY, True)
    _studies.wait_until_ready(study)
    assert not caplog.text


# --- a database that is away ----------------------------------------------------------

def test_a_storage_call_waits_out_a_lost_connection_and_marks_when_the_database_returned(
        monkeypatch):
    import sqlalchemy.exc

    monkeypatch.setattr(optuna_storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():  # as Optuna's RDBStorage raises it: the driver's error as the cause
        calls.append(1)
        if len(calls) < 3:
            lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("refused"))
            raise optuna.exceptions.StorageInternalError("commit failed") from lost
        return "done"

    before = time.time()
    assert optuna_storage.Patient.call(flaky, 60, 2, "get_all_trials") == "done"
    assert len(calls) == 3 and optuna_storage.Patient.recovered_at >= before

    def bad_query():
        raise optuna.exceptions.StorageInternalError("too long")  # no lost connection

    with pytest.raises(optuna.exceptions.StorageInternalError):
        optuna_storage.Patient.call(bad_query, 60, 2, "set_trial_param")


def test_after_an_outage_a_silent_trial_gets_a_full_stale_window_from_the_databases_return(
        monkeypatch):
    from hydra_plugins.mlplab_optuna_sweeper import _studies

    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr(_studies.HEARTBEAT, time.time() - 100)  # silent through an outage
    ledger = _studies.Ledger(study, stale_seconds=60)
    monkeypatch.setattr(optuna_storage.Patient, "recovered_at", time.time() - 10)
    assert [t.state for t in ledger.trials()] == [TrialState.RUNNING], "not stale yet"
    monkeypatch.setattr(optuna_storage.Patient, "recovered_at", time.time() - 61)
    assert [t.state for t in ledger.trials()] == [TrialState.FAIL], "stale now"

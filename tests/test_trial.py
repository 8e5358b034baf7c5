"""The seam's contract (mlplab.trial): what a job may return to the sweeper."""

from __future__ import annotations

import numpy as np
import pytest

from mlplab.trial import Outcome, read_outcome


@pytest.mark.parametrize("returned, objectives, final", [
    (0.5, ["val_acc"], {"val_acc": 0.5}),
    (np.float32(0.25), ["value"], {"value": 0.25}),  # NumPy's scalars are numbers too
    (3, ["loss"], {"loss": 3.0}),
    ([0.5, 1200], ["val_acc", "n_params"], {"val_acc": 0.5, "n_params": 1200.0}),
])
def test_a_number_or_numbers_become_the_objectives_values(returned, objectives, final):
    assert read_outcome(returned, objectives) == Outcome(final)


def _app_outcome(*args, **kwargs):
    from mlplab.commands.train import Outcome as TrainOutcome  # mlplab's task returns it

    return TrainOutcome(*args, **kwargs)


@pytest.mark.parametrize("make", [Outcome, _app_outcome], ids=["contract", "mlplab app"])
def test_an_outcome_is_taken_as_it_is_and_the_sweeper_reads_it_so(make):
    from hydra_plugins.mlplab_optuna_sweeper._rules import verdict

    outcome = make({"val_acc": 0.4, "test_acc": 0.39, "n_params": 120}, pruned_at=300)
    assert read_outcome(outcome, ["val_acc"]) is outcome
    read = verdict(outcome, ["val_acc", "n_params"])  # the sweeper's side of the seam
    assert (read.values, read.test_acc, read.pruned_at) == ([0.4, 120], 0.39, 300)
    assert verdict(make({}, failure="Diverged: nan"), ["val_acc"]).failure == \
        "Diverged: nan"


@pytest.mark.parametrize("returned, message", [
    ("0.5", "the task returned '0.5': allowed a number"),
    (None, "the task returned None"),
    (True, "the task returned True"),
    ([0.5], "1 values for the objectives ['val_acc', 'n_params']"),
])
def test_anything_else_is_refused_naming_what_came_back(returned, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_outcome(returned, ["val_acc", "n_params"])


def test_a_job_reports_to_its_trial_and_hears_the_pruner_stored_on_the_study(tmp_path):
    import optuna

    from mlplab.trial import PRUNER_ATTR, TrialConfig, reporter

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.set_user_attr(PRUNER_ATTR, {"_target_": "optuna.pruners.ThresholdPruner",
                                      "lower": 0.3})
    trial = study.ask()
    report = reporter(TrialConfig(url, "s", trial.number))
    assert report(0.5, 100) is False
    assert report(0.1, 100) is False, "a step reported again keeps its first value"
    assert report(0.2, 200) is True  # below the threshold: stop
    frozen = study.trials[trial.number]
    assert frozen.intermediate_values == {100: 0.5, 200: 0.2}
    assert reporter(TrialConfig()) is None  # not a job of a sweep that prunes


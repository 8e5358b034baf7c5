"""The sweep's rules as plain functions: stages, budgets, narrowing, resume, the final
step's slots and choice, several objectives, a job's outcome. No Hydra, MLflow,
storage or launcher here; a subprocess proves the rules import without them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import optuna
import pytest
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.mlplab_optuna_sweeper._rules import (
    CARRIED,
    CHOOSE,
    DROPPED,
    FAILURE,
    FINAL,
    TEST_ACC,
    Candidate,
    StageRecord,
    choose,
    first_of_their_slot,
    front_pick,
    narrow,
    narrowed,
    pareto_front,
    plan,
    resume_diffs,
    retrain_plan,
    verdict,
    within_budget,
)
from mlplab.engine.checks import ArgumentError
from mlplab.trial import Outcome

LAM = FloatDistribution(1e-5, 1e-1, log=True)


@dataclass
class Param:
    """A searched key as the rules see it (`_space.Param` adds Hydra's override text)."""

    name: str
    distribution: BaseDistribution


def _trial(number, values=None, state=TrialState.COMPLETE, **params):
    dists = {k: LAM if k == "lam" else IntDistribution(0, 99) for k in params}
    t = optuna.trial.create_trial(params=params, distributions=dists, values=values,
                                  state=state)
    t.number = number
    return t


def test_the_rules_import_and_run_without_hydra_mlflow_or_omegaconf():
    code = """
import sys
for name in ("hydra", "omegaconf", "mlflow"):
    sys.modules[name] = None  # any import of these now raises ImportError
from hydra_plugins.mlplab_optuna_sweeper import _rules
print([s.label for s in _rules.plan(3, [], {"top_m": 2, "seeds": 1,
      "choose_in": "last_stage", "overrides": []})])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['0', 'choose', 'final']"


def test_the_plan_lists_the_stages_then_the_final_steps_with_their_budgets():
    stages = plan(20, [{"n_trials": None, "overrides": []},
                       {"n_trials": 8, "overrides": ["cycles=3"]}],
                  {"top_m": 3, "seeds": 2, "choose_in": "final", "overrides": ["x=1"]})
    assert [(s.label, s.n_trials, s.overrides) for s in stages] == [
        ("0", 20, []), ("1", 8, ["cycles=3"]), (FINAL, 6, ["x=1"])]
    compared = plan(5, [], {"top_m": 3, "seeds": 2, "choose_in": "last_stage",
                            "overrides": []})
    # compared in the last stage's setting, 3 x 2; then only the winner retrains
    assert [(s.label, s.n_trials, s.study_suffix) for s in compared] == [
        ("0", 5, "stage0"), (CHOOSE, 6, CHOOSE), (FINAL, 2, FINAL)]
    with pytest.raises(ArgumentError, match=r"stages\[1\].n_trials=0"):
        plan(5, [{"n_trials": 2, "overrides": []}, {"n_trials": 0, "overrides": []}], None)


def test_the_budget_is_the_first_n_counted_trials_by_number_for_every_worker():
    trials = [_trial(0, [0.5], lam=1e-3),
              _trial(1, None, TrialState.FAIL, lam=1e-3),  # dropped: not counted
              _trial(2, None, TrialState.RUNNING, lam=1e-3),
              _trial(3, None, TrialState.RUNNING, lam=1e-3),
              _trial(4, None, TrialState.RUNNING, lam=1e-3)]
    trials[1].user_attrs[DROPPED] = "interrupted"
    assert within_budget(trials, 3, [3, 4]) == [3]  # 4 is over: another worker has 2
    trials[1].user_attrs[FAILURE] = "diverged"  # a real outcome counts
    assert within_budget(trials, 3, [3, 4]) == []
    carried = _trial(5, [0.9], lam=1e-3)
    carried.user_attrs[CARRIED] = "stage0 trial 3"  # information, not budget
    assert within_budget([*trials, carried], 5, [4, 5]) == [4]


def test_narrowing_spans_the_best_values_of_log_parameters_widened_by_the_margin():
    params = [Param("lam", LAM), Param("x", FloatDistribution(0, 1))]
    best = [{"lam": 1e-3, "x": 0.2}, {"lam": 4e-3, "x": 0.9}, {"lam": 2e-3, "x": 0.5}]
    exact = {p.name: p.distribution for p in narrow(params, best, margin=0.0)}
    assert (exact["lam"].low, exact["lam"].high) == (1e-3, 4e-3) and exact["lam"].log
    assert exact["x"] == FloatDistribution(0.0, 1.0)  # linear parameters keep their range
    wide = {p.name: p.distribution for p in narrow(params, best, margin=1.0)}
    assert wide["lam"].low == pytest.approx(1e-4) and wide["lam"].high == pytest.approx(4e-2)
    clipped = narrow(params, best, margin=3.0)[0].distribution
    assert (clipped.low, clipped.high) == (1e-5, 1e-1)  # never beyond the previous stage


def test_a_stage_left_with_one_complete_trial_by_its_pruner_is_not_narrowed_to_a_point(
        caplog):
    params = [Param("lam", LAM)]
    trials = [_trial(0, [0.52], lam=1e-3), _trial(1, [0.40], TrialState.PRUNED, lam=1e-4),
              _trial(2, [0.42], TrialState.PRUNED, lam=4e-3)]
    assert narrowed(StageRecord("0", params, trials), 3, 0.0, maximize=True) == params
    trials[1] = _trial(1, [0.5], lam=1e-4)
    [lam] = narrowed(StageRecord("0", params, trials), 3, 0.0, True)
    assert (lam.distribution.low, lam.distribution.high) == (1e-4, 1e-3)
    assert "top_k=3 takes all 2 complete trials (1 pruned)" in caplog.text
    caplog.clear()
    narrowed(StageRecord("0", params, trials[:2]), 3, 0.0, True)  # none pruned
    narrowed(StageRecord("0", params, [*trials, trials[0]]), 2, 0.0, True)  # 3 complete
    assert "takes all" not in caplog.text


def _settings(*n_trials, final=None, pruner="none"):
    stages = [{"stage": str(i), "n_trials": n, "overrides": []}
              for i, n in enumerate(n_trials)]
    if final is not None:
        stages.append({"stage": FINAL, "n_trials": final, "overrides": []})
    return {"direction": "maximize", "pruner": {"name": pruner}, "stages": stages}


def test_a_resume_needs_the_same_search_and_a_budget_grows_until_the_next_stage_starts():
    stored = _settings(10, 5, final=1)
    assert resume_diffs(stored, _settings(12, 5, final=3), started=set()) == []
    assert resume_diffs(stored, _settings(10, 7, final=1), started={"0", "1"}) == []
    assert resume_diffs(stored, _settings(12, 5, final=1), started={"0", "1"}) == [
        "stage 0 n_trials 10 -> 12 (stage 1 already started from its trials)"]
    assert resume_diffs(stored, _settings(8, 5, final=1), started=set()) == [
        "stage 0 n_trials 10 -> 8 (a budget may grow, not shrink)"]
    assert resume_diffs(stored, _settings(10, 5, final=1, pruner="median"), set()) == [
        "pruner {'name': 'none'} -> {'name': 'median'}"]
    assert resume_diffs(stored, _settings(10, final=1), set()) == [
        "stages ['0', '1', 'final'] -> ['0', 'final']"]


def test_the_final_step_retrains_the_best_distinct_trials_with_new_seeds_when_comparing():
    params = [Param("lam", LAM)]
    last = StageRecord("1", params, [_trial(0, [0.50], lam=1e-3), _trial(1, [0.55], lam=2e-3),
                                     _trial(2, [0.55], lam=2e-3), _trial(3, [0.53], lam=3e-3)])
    directions = ["maximize"]
    _, cands, seeds = retrain_plan([last], FINAL, 2, 3, 0, directions, 0.0)
    assert cands == [{"lam": 2e-3}, {"lam": 3e-3}] and seeds == [0, 1, 2]
    # compared in the last stage's setting: not its own seed 0, which ranked them
    _, cands, seeds = retrain_plan([last], CHOOSE, 2, 2, 0, directions, 0.0)
    assert seeds == [1, 2]
    _, _, seeds = retrain_plan([last], CHOOSE, 1, 2, 0, directions, 0.0)
    assert seeds == [], "a lone candidate is not compared"
    compared = StageRecord(CHOOSE, params, [
        _trial(4, [0.54], lam=2e-3, seed=1), _trial(5, [0.50], lam=2e-3, seed=2),
        _trial(6, [0.53], lam=3e-3, seed=1), _trial(7, [0.53], lam=3e-3, seed=2)],
        candidates=[{"lam": 2e-3}, {"lam": 3e-3}])
    _, cands, seeds = retrain_plan([last, compared], FINAL, 2, 2, 0, directions, 0.0)
    assert cands == [{"lam": 3e-3}] and seeds == [0, 1], "the best mean: 0.53 > 0.52"


def test_two_workers_on_one_free_slot_leave_it_to_the_lower_trial_number():
    trials = [_trial(0, [0.5], lam=1e-3, seed=0),
              _trial(1, None, TrialState.RUNNING, lam=1e-3, seed=1),  # another worker's
              _trial(2, None, TrialState.RUNNING, lam=1e-3, seed=1),  # this one's: same slot
              _trial(3, None, TrialState.RUNNING, lam=2e-3, seed=0)]
    assert first_of_their_slot([2, 3], trials, {"lam", "seed"}) == [3]


def test_the_final_step_chooses_the_best_mean_over_seeds_not_the_best_single_run():
    lucky = Candidate({"lam": 1e-3}, val=[0.60, 0.50], test=[0.58, 0.49])
    steady = Candidate({"lam": 4e-3}, val=[0.57, 0.56], test=[0.55, 0.56])
    assert choose([lucky, steady], maximize=True) is steady
    assert choose([lucky, steady], maximize=False) is lucky
    assert choose([Candidate({"lam": 1.0}, [], [])], maximize=True) is None
    # a candidate whose second retrain failed or diverged is not compared on the other
    broken = Candidate({"lam": 1e-2}, val=[0.61], test=[0.60])
    assert choose([broken, steady], maximize=True) is steady
    assert choose([broken, Candidate({"lam": 1.0}, [0.3], [0.3])], maximize=True) is broken


def test_the_pareto_front_keeps_the_trials_no_other_beats_in_every_objective():
    trials = [_trial(0, [0.50, 100]), _trial(1, [0.55, 400]), _trial(2, [0.45, 300]),
              _trial(3, [0.54, 200]), _trial(4, [0.55, 500])]
    # maximise accuracy, minimise size: 2 is beaten by 0 (and 3); 4 by 1
    front = pareto_front(trials, ["maximize", "minimize"])
    assert [t.number for t in front] == [1, 3, 0], "best first objective first"


def test_the_final_rule_takes_the_best_second_objective_within_the_tolerance_of_the_first():
    directions = ["maximize", "minimize"]
    front = pareto_front([_trial(0, [0.50, 100]), _trial(1, [0.55, 400]),
                          _trial(3, [0.54, 200])], directions)
    assert front_pick(front, directions, 0.0).number == 1  # the most accurate
    assert front_pick(front, directions, 0.01).number == 3  # smaller, 0.01 below
    assert front_pick(front, directions, 0.1).number == 0  # the smallest of them all
    assert front_pick([], directions, 0.0) is None


@pytest.mark.parametrize("returned, values, failure, fatal", [
    (0.5, [0.5], None, None),
    (Outcome({"val_acc": 0.5, TEST_ACC: 0.4}), [0.5], None, None),
    (float("nan"), None, "diverged: the objective is [nan]", None),
    (Outcome.failed("FloatingPointError: overflow"), None, "FloatingPointError: overflow",
     None),
    (Outcome({"train_acc": 0.5}), None, "no objective ['val_acc'] in the task's outcome",
     "the task's outcome has ['train_acc']"),
    ("0.5", None, "the task returned '0.5'", "the task returned '0.5'"),
])
def test_a_jobs_outcome_is_a_value_a_failure_or_a_fault_every_trial_would_share(
        returned, values, failure, fatal):
    v = verdict(returned, ["val_acc"])
    assert v.values == values
    assert (v.failure or "").startswith(failure or "") and bool(v.failure) == bool(failure)
    assert (v.fatal or "").startswith(fatal or "") and bool(v.fatal) == bool(fatal)
    if isinstance(returned, Outcome) and values:
        assert v.test_acc == 0.4

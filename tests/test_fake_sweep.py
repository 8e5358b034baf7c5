"""A whole staged search driven with a fake launcher, Optuna in memory and no MLflow:
the sweeper's driver and rules, fast (the real launcher, store and task: test_sweeper)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hydra_plugins.mlplab_optuna_sweeper import _parallel
from hydra_plugins.mlplab_optuna_sweeper._driver import Sweep
from hydra_plugins.mlplab_optuna_sweeper._records import ParentRun
from hydra_plugins.mlplab_optuna_sweeper._rules import FAILURE
from hydra_plugins.mlplab_optuna_sweeper.config import MlplabOptunaSweeperConf
from mlplab.trial import Outcome


def task(overrides: list[str]) -> Outcome:
    """A job: validation peaks at lam=1e-3, improves with cycles, fails above 0.01."""
    args = dict(o.split("=", 1) for o in overrides)
    lam, cycles = float(args["lam"]), int(args.get("cycles", 2))
    if lam > 0.01:
        raise FloatingPointError(f"diverged at lam={lam}")
    val = 0.5 - (math.log10(lam) + 3) ** 2 / 20 + 0.01 * cycles \
        + 0.001 * int(args.get("seed", 0))
    return Outcome({"val_acc": val, "test_acc": val - 0.01})


class Returned:
    """What Hydra's launcher hands back for a job: its value, or its error re-raised."""

    def __init__(self, overrides):
        try:
            self.value, self.error = task(overrides), None
        except Exception as err:
            self.value, self.error = None, err

    @property
    def return_value(self):
        if self.error is not None:
            raise self.error
        return self.value


class FakeLauncher:
    def __init__(self):
        self.jobs: list[list[str]] = []

    def launch(self, overrides, initial_job_idx):
        self.jobs += [list(o) for o in overrides]
        return [Returned(o) for o in overrides]


class MemoryParent(ParentRun):
    """The parent run's record kept in memory: the summary's logic, no MLflow."""

    spool_id = "memory"

    def __init__(self, experiment, sweep_dir):
        super().__init__("memory", experiment, sweep_dir)
        self.params, self.tags, self.metrics, self.artifacts = {}, {}, {}, {}
        self.failures, self.status = [], None

    def attach(self, *args, **kwargs):
        return self.spool_id

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=0):
        self.metrics.update({(k, step): v for k, v in metrics.items() if v is not None})

    def set_tags(self, tags):
        self.tags.update(tags)

    def _artifact(self, path: Path):
        self.artifacts[path.name] = path.read_bytes()

    def record_failure(self, stage, trial, params, failure):
        self.failures.append((stage, trial.number, failure))

    def mark_ended(self, *args, **kwargs):
        pass

    def set_status(self, status):
        self.status = status

    def detach(self):
        pass


def _sweep(tmp_path, **settings):
    conf = OmegaConf.merge(OmegaConf.structured(MlplabOptunaSweeperConf), {
        "params": {"lam": "tag(log, interval(1e-5, 1e-1))"}, "sampler": "random",
        "seed": 0, "workers": 1, "study_name": "fake",
        "stages": [{"n_trials": 8}, {"n_trials": 4, "overrides": ["cycles=3"]}],
        "final": {"top_m": 2, "seeds": 2, "overrides": ["cycles=4"], "seed_key": "seed"}},
        settings)
    config = OmegaConf.create({"seed": 0, "hydra": {
        "launcher": {"_target_": _parallel.BASIC_LAUNCHER},
        "sweep": {"dir": str(tmp_path)}, "job": {"name": "fake"}}})
    launcher, parents = FakeLauncher(), []

    def parent_run(experiment, sweep_dir):
        parents.append(MemoryParent(experiment, sweep_dir))
        return parents[-1]

    records = Sweep(conf, config, launcher, lambda o: OmegaConf.create({"seed": 0}),
                    parent_run).run([])
    return records, launcher, parents[0]


def test_a_staged_search_narrows_retrains_its_best_and_records_the_answer(tmp_path):
    records, launcher, parent = _sweep(tmp_path)
    stage0, stage1, final = records
    assert [r.label for r in records] == ["0", "1", "final"]
    assert len(stage0.trials) == 8 and len(stage1.trials) == 4

    # a diverged trial is counted FAIL with its reason, and the sweep goes on
    diverged = [t for t in stage0.failed() if FAILURE in t.user_attrs]
    assert diverged and {t.number for t in diverged} == {n for _, n, _ in parent.failures}
    assert all(t.params["lam"] > 0.01 for t in diverged)

    # stage 1 searches the span of stage 0's best 3 lambdas, with its own overrides
    best3 = sorted(t.params["lam"] for t in stage0.top(3, maximize=True))
    span = stage1.params[0].distribution
    assert (span.low, span.high) == (best3[0], best3[-1])
    assert all(best3[0] <= t.params["lam"] <= best3[-1] for t in stage1.trials)
    assert all("cycles=3" in job for job in launcher.jobs[8:12])

    # the final step retrains stage 1's best 2, 2 seeds each, and keeps the best mean
    top2 = [t.params["lam"] for t in stage1.top(2, maximize=True)]
    assert sorted((t.params["lam"], t.params["seed"]) for t in final.trials) == \
        sorted((lam, seed) for lam in top2 for seed in (0, 1))
    assert all("cycles=4" in job for job in launcher.jobs[12:])
    best = min(top2, key=lambda lam: abs(math.log10(lam) + 3))
    assert parent.tags["best.lam"] == best
    assert parent.metrics[("final_val_acc", 0)] == pytest.approx(
        0.5 - (math.log10(best) + 3) ** 2 / 20 + 0.04 + 0.0005)
    assert "trials.csv" in parent.artifacts and parent.status == "FINISHED"


def test_a_resume_keeps_the_finished_trials_and_runs_only_what_the_grown_budget_adds(
        tmp_path):
    journal = f"journal:{tmp_path / 'optuna.log'}"
    first, _, _ = _sweep(tmp_path, storage=journal, final=None)
    again, launcher, _ = _sweep(tmp_path, storage=journal, final=None,
                                stages=[{"n_trials": 8}, {"n_trials": 6,
                                                          "overrides": ["cycles=3"]}])
    assert len(launcher.jobs) == 2, "only the 2 trials the grown stage 1 adds"
    assert [t.number for t in again[0].trials] == [t.number for t in first[0].trials]

    with pytest.raises(Exception, match="a budget may grow, not shrink"):
        _sweep(tmp_path, storage=journal, final=None,
               stages=[{"n_trials": 7}, {"n_trials": 6, "overrides": ["cycles=3"]}])


def test_a_budget_cannot_grow_once_the_final_steps_comparison_has_started_from_it(tmp_path):
    journal = f"journal:{tmp_path / 'optuna.log'}"
    final = {"top_m": 2, "seeds": 1, "choose_in": "last_stage", "seed_key": "seed"}
    _sweep(tmp_path, storage=journal, final=final)  # studies fake.choose and fake.final
    grown = [{"n_trials": 8}, {"n_trials": 6, "overrides": ["cycles=3"]}]
    with pytest.raises(Exception, match="stage 1 n_trials 4 -> 6 .stage choose already"):
        _sweep(tmp_path, storage=journal, stages=grown,
               final={**final, "choose_in": "final"})


def test_stage_settings_may_be_interpolations(tmp_path):
    records, _, _ = _sweep(tmp_path, n_trials=5, final=None,
                           stages=[{"n_trials": "${n_trials}"}])
    assert len(records[0].trials) == 5

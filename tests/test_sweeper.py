"""The coarse-to-fine sweeper (hydra/sweeper=mlplab_optuna): the shipped search
composed from conf/ and shrunk to tiny data, run in-process or as real workers."""

from __future__ import annotations

import csv
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.mlplab_optuna_sweeper import _parallel, _space
from hydra_plugins.mlplab_optuna_sweeper._rules import (
    StageRecord,
    trial_seed,
)
from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import main
from mlplab.engine import threads, trainer

STUDY = "c2f"


# --- the search space and narrowing ---------------------------------------------------

def test_hydra_sweep_syntax_becomes_optuna_distributions_and_fixed_overrides_pass_through():
    params, fixed = _space.parse([
        "lam=tag(log, interval(1e-5, 1e-1))", "x=interval(0, 1)", "n=int(interval(8, 64))",
        "w=int(tag(log, interval(8, 512)))", "k=range(8, 64, 8)",
        "model.layers=choice([50], [50,50])", "+search=lambda_c2f", "model.init=xavier"])
    d = {p.name: p.distribution for p in params}
    assert d["lam"] == FloatDistribution(1e-5, 1e-1, log=True)
    assert d["x"] == FloatDistribution(0.0, 1.0)
    assert d["n"] == IntDistribution(8, 64)
    assert d["w"] == IntDistribution(8, 512, log=True)
    assert d["k"] == IntDistribution(8, 56, step=8)  # Hydra's range excludes its stop
    assert isinstance(d["model.layers"], CategoricalDistribution)
    layers = next(p for p in params if p.name == "model.layers")
    assert layers.override("[50,50]") == "model.layers=[50,50]"  # a list again, not a string
    assert fixed == ["+search=lambda_c2f", "model.init=xavier"]


def test_a_later_override_of_a_searched_key_wins_so_the_command_line_beats_the_search_file():
    params, fixed = _space.parse(["lam=tag(log, interval(1e-5, 1e-1))", "lam=0.01"])
    assert params == [] and fixed == ["lam=0.01"]
    params, _ = _space.parse(["lam=0.01", "lam=interval(0.1, 0.2)"])
    assert params[0].distribution == FloatDistribution(0.1, 0.2)


def test_the_shipped_search_composes_the_reports_protocol():
    import mlplab.commands.train  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+search=lambda_c2f"], return_hydra_config=True)
    assert (cfg.data.split, cfg.data.n_val) == ("all", 5000)  # 45,000 train / 5,000 val
    assert (cfg.schedule.n_s, cfg.schedule.n_s_k, cfg.schedule.cycles) == (None, 2, 2)
    s = cfg.hydra.sweeper
    assert s._target_.endswith("MlplabOptunaSweeper")
    assert s.params.lam == "tag(log, interval(1e-5, 1e-1))"
    assert [st.n_trials for st in s.stages] == [10, 8] and s.top_k == 3
    assert "data.n_val=1000" in s.final.overrides
    assert s.pruner == "none" and s.final.top_m == 1 and s.final.choose_in == "final"
    # with hydra.sweeper.pruner=median: from the 3rd evaluation of a 900-step half-cycle
    assert (s.pruning.n_startup_trials, s.pruning.n_warmup_steps) == (3, 540)


def test_the_shipped_toolbox_search_screens_best_mlp_with_tpe_and_hyperband_from_the_recipe():
    import mlplab.commands.train  # noqa: F401  (registers the schema)
    from hydra_plugins.mlplab_optuna_sweeper import _pruning, _samplers

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+search=best_mlp"], return_hydra_config=True)
        recipe = compose("config", overrides=["experiment=best_mlp"])
    assert (cfg.model.layers, cfg.bn, cfg.augment.name) == ([1024, 1024], True,
                                                            "flip_translate")
    assert cfg.schedule.epochs == 6 and cfg.train.evals_per_cycle == 1  # a short screen
    s = cfg.hydra.sweeper
    assert set(s.params) >= {"schedule.eta", "lam", "train.label_smoothing",
                             "augment.max_shift"}
    assert s.pruner == "hyperband" and s.pruning.max_resource == 6 * 450
    assert "schedule.epochs=50" in s.final.overrides  # retrained longer than the recipe
    # the first trial is the hand-made recipe, and TPE leaves its start-up in every
    # Hyperband bracket
    assert s.warm_start[0] == {k: OmegaConf.select(recipe, k) for k in s.params}
    sampler = _samplers.spec(s.sampler)
    share = _pruning.bracket_share(_pruning.describe(s.pruner, s.pruning))
    assert _samplers.startup(sampler, s.n_trials, "0", share) < s.n_trials * share


# --- sweeps on tiny data --------------------------------------------------------------

@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made: creating it takes seconds."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, empty_mlflow_db) -> str:
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _overrides(tmp_path, tiny_cifar, tracking_uri, *extra, storage="journal"):
    url, md5 = tiny_cifar
    store = {"journal": f"journal:{tmp_path / 'optuna.log'}",
             "sqlite": f"sqlite:///{tmp_path / 'optuna.db'}"}[storage]
    return ["+search=lambda_c2f", f"data.url={url}", f"data.md5={md5}",
            f"data.root={tmp_path / 'data'}", "data.n_val=30", "train.batch_size=10",
            "model.layers=[8]", "schedule.n_s=6", "schedule.n_s_k=null",
            f"tracking.uri={tracking_uri}", f"hydra.sweeper.storage={store}",
            f"hydra.sweeper.study_name={STUDY}", "hydra.sweeper.workers=1",
            "hydra.sweeper.heartbeat_seconds=0.5",
            "hydra.sweeper.stale_seconds=5",
            "hydra.sweeper.final.overrides=['data.n_val=20','schedule.cycles=3']", *extra]


def _sweep(monkeypatch, tmp_path, overrides, run_dir="multirun"):
    """`python train.py --multirun ...` in this process, from tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "--multirun",
                                      f"hydra.sweep.dir={tmp_path / run_dir}", *overrides])
    main()


def _studies(tmp_path, storage="journal"):
    store = (optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "optuna.log"))) if storage == "journal"
        else f"sqlite:///{tmp_path / 'optuna.db'}")
    names = optuna.study.get_all_study_names(store)
    return {n[len(STUDY) + 1:] or "sweep": optuna.load_study(study_name=n, storage=store)
            for n in names}


def _best(study, k):
    """The study's best k complete trials (ties: the earlier trial)."""
    return sorted(study.get_trials(states=[TrialState.COMPLETE]),
                  key=lambda t: (-t.value, t.number))[:k]


def _counted(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "failure" in t.user_attrs)]


def _raise_at_call(monkeypatch, n: int, error: BaseException) -> None:
    """Make the n-th training of this test raise `error` (Ctrl-C, a crash); the
    others train for real."""
    real_train, calls = trainer.train, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trainer, "train", train)


def _parent_and_children(tracking_uri):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mlplab.sweep") == "true"]
    assert len(parents) == 1, "every worker and re-run attaches to one parent run"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_stage_two_searches_the_span_of_stage_ones_best_and_mlflow_nests_every_trial(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    # trials in pairs on the joblib launcher, studies in an SQLite database
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.top_k=2",
        "hydra.sweeper.params.lam='tag(log, interval(1e-4, 30))'",
        "hydra.sweeper.stages.0.n_trials=5", "hydra.sweeper.stages.1.n_trials=3",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
        storage="sqlite"))

    studies = _studies(tmp_path, "sqlite")
    stage0, stage1, final = studies["stage0"], studies["stage1"], studies["final"]
    assert (len(_counted(stage0)), len(_counted(stage1)), len(_counted(final))) == (5, 3, 1)
    top = _best(stage0, 2)
    low, high = sorted(t.params["lam"] for t in top)
    assert all(low <= t.params["lam"] <= high for t in stage1.trials)
    assert high / low < 30 / 1e-4, "stage 1 searches a narrower range"
    best = max(stage1.get_trials(states=[TrialState.COMPLETE]), key=lambda t: t.value)
    assert final.trials[0].params["lam"] == best.params["lam"]

    client, parent, children = _parent_and_children(tracking_uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["mlplab.study"] == STUDY
    assert sorted((r.data.tags["stage"], int(r.data.tags["trial"])) for r in children) == \
        [("0", n) for n in range(5)] + [("1", n) for n in range(3)] + [("final", 0)]
    assert all(r.info.status == "FINISHED" for r in children)
    final_run = next(r for r in children if r.data.tags["stage"] == "final")
    assert final_run.data.params["data.n_val"] == "20"  # the final overrides reached it
    assert parent.data.metrics["final_test_acc"] == final_run.data.metrics["test_acc"]
    assert parent.data.metrics["best_lam"] == best.params["lam"]
    assert parent.data.tags["best.lam"] == str(best.params["lam"])  # the sweep's answer
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "accuracy_vs_lam_stage0.png", "accuracy_vs_lam_stage1.png"} <= artifacts
    with open(client.download_artifacts(parent.info.run_id, "trials.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["stage", "number", "state", "value", "test_acc", "pruned_at",
                             "lam", "train.seed"]
    assert [r["stage"] for r in rows] == ["0"] * 5 + ["1"] * 3 + ["final"]


def test_failing_and_diverging_trials_are_recorded_failed_and_the_sweep_goes_on(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    # eta_max=1e6 diverges (the app returns NaN); a batch larger than the data raises
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "schedule.eta_max=choice(0.1, 1e6)",
        "train.batch_size=choice(10, 100000)", "hydra.sweeper.stages=[{n_trials: 8}]",
        "hydra.sweeper.final=null"))

    stage = _studies(tmp_path)["stage0"]
    assert len(_counted(stage)) == 8, "failures count towards the budget"
    failures = [t.user_attrs["failure"] for t in stage.trials if t.state == TrialState.FAIL]
    assert any("diverged" in f for f in failures)
    assert any("ConfigError" in f and "batch_size" in f for f in failures)
    assert stage.get_trials(states=[TrialState.COMPLETE]), "good trials after failed ones"

    _, parent, children = _parent_and_children(tracking_uri)
    assert parent.info.status == "FINISHED"
    by_trial = {int(r.data.tags["trial"]): r for r in children}
    assert sorted(by_trial) == list(range(8))
    for t in stage.trials:
        run = by_trial[t.number]
        assert run.info.status == ("FAILED" if t.state == TrialState.FAIL else "FINISHED")
        if t.state == TrialState.FAIL:
            assert run.data.tags["failure"]


def test_a_rerun_after_ctrl_c_keeps_finished_trials_and_only_runs_the_rest(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri,
                           "hydra.sweeper.stages=[{n_trials: 4}]", "hydra.sweeper.final=null")
    real_train = trainer.train
    _raise_at_call(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _sweep(monkeypatch, tmp_path, overrides)
    before = {t.number: (t.params, t.value) for t in _counted(_studies(tmp_path)["stage0"])}
    assert sorted(before) == [0, 1]
    _, parent, children = _parent_and_children(tracking_uri)
    assert parent.info.status == "KILLED"
    assert {r.data.tags["trial"]: r.info.status for r in children} == \
        {"0": "FINISHED", "1": "FINISHED", "2": "KILLED"}

    monkeypatch.setattr(trainer, "train", real_train)
    _sweep(monkeypatch, tmp_path, overrides, run_dir="multirun2")
    stage = _studies(tmp_path)["stage0"]
    after = {t.number: (t.params, t.value) for t in _counted(stage)}
    assert len(after) == 4, "the budget counts the trials kept from the first run"
    assert {n: after[n] for n in before} == before, "finished trials are kept, not re-run"
    assert [t.state for t in stage.trials if t.number == 2] == [TrialState.FAIL]
    _, parent, children = _parent_and_children(tracking_uri)
    assert parent.info.status == "FINISHED"
    finished = sorted(int(r.data.tags["trial"]) for r in children
                      if r.info.status == "FINISHED")
    assert finished == sorted(after), "one finished run per counted trial, none twice"


# --- pruning and the final step ---------------------------------------------------------

def _child_runs(tracking_uri, stage="0"):
    _, parent, children = _parent_and_children(tracking_uri)
    return parent, {int(r.data.tags["trial"]): r for r in children
                    if r.data.tags["stage"] == stage}


def test_a_pruner_stops_trials_whose_curve_is_clearly_worse_also_after_a_resume(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    # eta_max=1e-7 cannot learn: its curve stays where it starts, under the good trials'
    # (all alike: same seed, lam pinned). The first run is interrupted at its 4th trial.
    good, bad = 0.1, 1e-7
    overrides = _overrides(
        tmp_path, tiny_cifar, tracking_uri, f"schedule.eta_max=choice({good}, {bad})",
        "schedule.eta_min=1e-9", "lam=0.001", "hydra.sweeper.stages=[{n_trials: 8}]",
        "hydra.sweeper.final=null",
        "hydra.sweeper.pruner=median", "hydra.sweeper.pruning.n_startup_trials=1",
        "hydra.sweeper.pruning.n_warmup_steps=0")  # lambda_c2f's 540 is for 900-step cycles
    real_train = trainer.train
    _raise_at_call(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _sweep(monkeypatch, tmp_path, overrides)
    before = {t.number: t.state for t in _counted(_studies(tmp_path)["stage0"])}
    assert len(before) == 3
    monkeypatch.setattr(trainer, "train", real_train)
    _sweep(monkeypatch, tmp_path, overrides, run_dir="resumed")

    stage = _studies(tmp_path)["stage0"]
    counted = _counted(stage)
    assert len(counted) == 8, "pruned trials count towards the budget"
    assert {t.number: t.state for t in counted if t.number in before} == before, \
        "a resume keeps the pruned trials as they were"
    first_good = min(t.number for t in counted if t.params["schedule.eta_max"] == good)
    for t in counted:
        if t.params["schedule.eta_max"] == good:
            assert t.state == TrialState.COMPLETE, "a trial as good as the rest runs on"
        elif t.number > first_good:  # in both runs: the storage holds the curves
            assert t.state == TrialState.PRUNED, f"trial {t.number} was not pruned"
    pruned = [t for t in counted if t.state == TrialState.PRUNED]
    assert any(t.number > max(before) for t in pruned), "the resumed run prunes too"

    parent, runs = _child_runs(tracking_uri)
    client = MlflowClient(tracking_uri)

    def steps(run):
        return [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]

    full_steps = max(steps(runs[first_good]))
    for t in pruned:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.info.run_name.endswith(" PRUNED")
        assert run.data.tags["pruned"] == str(t.user_attrs["pruned_at"]) == str(max(steps(run)))
        assert max(steps(run)) < full_steps, "stopped early, its curve kept up to there"
    assert parent.data.metrics["n_pruned"] == len(pruned)
    with open(client.download_artifacts(parent.info.run_id, "trials.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["number"]) for r in rows if r["state"] == "PRUNED") == \
        sorted(t.number for t in pruned)
    assert all(r["pruned_at"] for r in rows if r["state"] == "PRUNED")


def test_without_a_storage_a_pruning_sweep_keeps_its_study_in_its_own_folder(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    # the jobs report to the study, so it cannot live in the sweeper's memory alone
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.storage=null",
        "hydra.sweeper.stages=[{n_trials: 2}]", "hydra.sweeper.final=null",
        "hydra.sweeper.pruner=median"))
    journal = tmp_path / "multirun" / "optuna-journal.log"
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))
    stage = optuna.load_study(study_name=f"{STUDY}.stage0", storage=storage)
    assert len(stage.trials) == 2
    assert all(len(t.intermediate_values) > 1 for t in stage.trials), "each reported its curve"


def test_a_bad_pruner_or_sampler_setting_is_refused_before_anything_is_recorded(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys):
    for bad, message in [("hydra.sweeper.pruner=halving", "hydra.sweeper.pruner='halving': "
                          "allowed ['none', 'median', 'successive_halving', 'hyperband']"),
                         ("hydra.sweeper.pruner=hyperband "
                          "hydra.sweeper.pruning.reduction_factor=1",
                          "hydra.sweeper.pruning.reduction_factor=1: allowed an int >= 2"),
                         ("hydra.sweeper.sampler={_target_:optuna.samplers.TPESampler,"
                          "multivariat:true}", "hydra.sweeper.sampler.multivariat: "),
                         ("hydra.sweeper.final.choose_in=stage1",
                          "hydra.sweeper.final.choose_in='stage1': allowed ['final', "
                          "'last_stage']")]:
        with pytest.raises(SystemExit) as exit_:
            _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri,
                                                     *bad.split()))
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert _no_runs(tracking_uri) and not (tmp_path / "optuna.log").exists()


def test_the_robust_final_step_retrains_the_top_m_with_seeds_and_logs_their_means(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.stages=[{n_trials: 3}]",
        "hydra.sweeper.final.top_m=2", "hydra.sweeper.final.seeds=2"))
    studies = _studies(tmp_path)
    top = _best(studies["stage0"], 2)
    final = studies["final"].get_trials(states=[TrialState.COMPLETE])
    assert sorted((t.params["lam"], t.params["train.seed"]) for t in final) == \
        sorted((t.params["lam"], seed) for t in top for seed in (0, 1))
    means = {lam: [t for t in final if t.params["lam"] == lam]
             for lam in (t.params["lam"] for t in top)}
    chosen = max(means, key=lambda lam: sum(t.value for t in means[lam]))
    runs = means[chosen]

    client, parent, children = _parent_and_children(tracking_uri)
    m = parent.data.metrics
    assert m["final_val_acc"] == pytest.approx(sum(t.value for t in runs) / 2)
    assert m["final_test_acc"] == pytest.approx(
        sum(t.user_attrs["test_acc"] for t in runs) / 2)
    assert m["final_seeds"] == 2 and "final_test_acc_sd" in m and "final_val_acc_sd" in m
    assert parent.data.tags["best.lam"] == str(chosen)
    history = client.get_metric_history(parent.info.run_id, "candidate_val_acc")
    assert sorted(h.step for h in history) == [0, 1]
    finals = [r for r in children if r.data.tags["stage"] == "final"]
    assert sorted(r.data.params["train.seed"] for r in finals) == ["0", "0", "1", "1"]
    assert (parent.data.tags["final.top_m"], parent.data.tags["final.seeds"]) == ("2", "2")

    # a resume may ask for more seeds: only the new slots run, and the parent says so
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.stages=[{n_trials: 3}]",
        "hydra.sweeper.final.top_m=2", "hydra.sweeper.final.seeds=3"))
    assert len(_studies(tmp_path)["final"].get_trials(states=[TrialState.COMPLETE])) == 6
    _, parent, _ = _parent_and_children(tracking_uri)
    assert parent.data.tags["final.seeds"] == "3" and parent.data.metrics["final_seeds"] == 3


def _chose_between_the_best_two(studies):
    """Check a choose step over stage 0's best 2 with 2 seeds, then a final of the winner
    with 2 seeds, each slot counted once; return the means, the winner, the finals."""
    top = _best(studies["stage0"], 2)
    compared = _counted(studies["choose"])
    # new seeds: the stage's own seed 0 is the draw that put these trials on top
    assert sorted((t.params["lam"], t.params["train.seed"]) for t in compared) == \
        sorted((t.params["lam"], seed) for t in top for seed in (1, 2))
    # in rank order, as the sweep breaks ties
    means = {t.params["lam"]: sum(c.value for c in compared
                                  if c.params["lam"] == t.params["lam"]) / 2 for t in top}
    winner = max(means, key=means.get)
    final = _counted(studies["final"])
    assert sorted((t.params["lam"], t.params["train.seed"]) for t in final) == \
        [(winner, 0), (winner, 1)], "only the winner retrains with the final overrides"
    return means, winner, final


def test_choosing_in_the_last_stages_setting_retrains_only_the_winner_with_the_final_overrides(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    search = ("hydra.sweeper.stages=[{n_trials: 3}]", "hydra.sweeper.final.top_m=2",
              "hydra.sweeper.final.seeds=2")
    _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri, *search,
                                             "hydra.sweeper.final.choose_in=last_stage"))
    means, winner, final = _chose_between_the_best_two(_studies(tmp_path))

    client, parent, children = _parent_and_children(tracking_uri)
    m = parent.data.metrics
    assert m["final_test_acc"] == pytest.approx(
        sum(t.user_attrs["test_acc"] for t in final) / 2)
    assert m["final_val_acc"] == pytest.approx(sum(t.value for t in final) / 2)
    assert m["final_seeds"] == 2 and parent.data.tags["best.lam"] == str(winner)
    history = client.get_metric_history(parent.info.run_id, "candidate_val_acc")
    assert sorted(h.value for h in history) == pytest.approx(sorted(means.values()))
    by_stage = {}
    for r in children:
        by_stage.setdefault(r.data.tags["stage"], []).append(r)
    assert {r.data.params["data.n_val"] for r in by_stage["choose"]} == {"30"}  # stage's
    assert {r.data.params["data.n_val"] for r in by_stage["final"]} == {"20"}
    assert {r.data.params["train.seed"] for r in by_stage["0"]} == {"0"}
    assert parent.data.tags["final.choose_in"] == "last_stage"

    # a resume may compare in the final setting instead: the winner's retrains are kept
    _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri, *search))
    final = _studies(tmp_path)["final"].trials
    assert len(final) == 4 and {t.state for t in final} == {TrialState.COMPLETE}
    _, parent, _ = _parent_and_children(tracking_uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["final.choose_in"] == "final"


def test_a_lone_candidate_is_not_compared_and_repeated_configurations_are_one_candidate(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.stages=[{n_trials: 2}]",
        "hydra.sweeper.final.seeds=2", "hydra.sweeper.final.choose_in=last_stage"))
    studies = _studies(tmp_path)
    [best] = _best(studies["stage0"], 1)
    assert studies["choose"].trials == []
    assert sorted((t.params["lam"], t.params["train.seed"]) for t in studies["final"].trials) \
        == [(best.params["lam"], 0), (best.params["lam"], 1)]
    _, parent, _ = _parent_and_children(tracking_uri)
    assert parent.data.tags["best.lam"] == str(best.params["lam"])

    def trial(value, layers):
        return optuna.trial.create_trial(
            params={"model.layers": layers}, value=value, distributions={
                "model.layers": CategoricalDistribution(["[8]", "[16]"])})

    record = StageRecord("0", [], [trial(0.5, "[8]"), trial(0.6, "[8]"), trial(0.4, "[16]")])
    assert [t.value for t in record.top(2, maximize=True)] == [0.6, 0.5]
    assert [t.value for t in record.top(2, maximize=True, distinct=True)] == [0.6, 0.4]


def test_a_rerun_retries_a_final_retrain_that_failed_and_nothing_else(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys):
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri,
                           "hydra.sweeper.stages=[{n_trials: 2}]")
    real_train = trainer.train
    _raise_at_call(monkeypatch, 3, MemoryError("the machine ran out of memory"))
    with pytest.raises(SystemExit) as exit_:
        _sweep(monkeypatch, tmp_path, overrides)
    assert exit_.value.code == 1 and "stage final: none of its 1 trials" in \
        capsys.readouterr().err
    [failed] = _studies(tmp_path)["final"].trials
    assert failed.state == TrialState.FAIL and "MemoryError" in failed.user_attrs["failure"]

    monkeypatch.setattr(trainer, "train", real_train)
    _sweep(monkeypatch, tmp_path, overrides, run_dir="rerun")
    studies = _studies(tmp_path)
    assert [t.state for t in studies["final"].trials] == [TrialState.FAIL,
                                                           TrialState.COMPLETE]
    assert len(studies["stage0"].trials) == 2, "the searched stage is not run again"
    _, parent, _ = _parent_and_children(tracking_uri)
    assert parent.info.status == "FINISHED" and "final_test_acc" in parent.data.metrics


def _no_runs(tracking_uri) -> bool:
    client = MlflowClient(tracking_uri)
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("bad", ["schedule.cycles=0",
                                 "hydra.sweeper.stages.1.overrides=['schedule.cycles=0']"])
def test_a_bad_config_value_stops_the_sweep_before_anything_is_recorded(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys, bad):
    # the second: only stage 1's jobs would get the bad value, after all of stage 0
    with pytest.raises(SystemExit) as exit_:
        _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri, bad))
    assert exit_.value.code == 2, "exits as a single run with a bad value does"
    err = capsys.readouterr().err
    assert "mlplab: error: schedule.cycles=0: must be an integer > 0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "optuna.log").exists(), "no study was made"
    assert _no_runs(tracking_uri), "no parent or trial run"


def test_a_data_error_that_no_sample_causes_stops_the_sweep_at_its_first_trial(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys):
    # passes validation, but the tiny data has too few rows: every trial would fail
    with pytest.raises(SystemExit) as exit_:
        _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri,
                                                 "data.n_val=100000"))
    assert exit_.value.code == 2
    assert "mlplab: error: data.n_val=100000" in capsys.readouterr().err
    [trial] = _studies(tmp_path)["stage0"].trials
    assert trial.state == TrialState.FAIL and not _counted(_studies(tmp_path)["stage0"]), \
        "not counted: a re-run with the fix replaces it"
    _, parent, children = _parent_and_children(tracking_uri)
    assert parent.info.status == "FAILED"
    assert [r.info.status for r in children] == ["FAILED"]


def test_a_stage_without_a_complete_trial_fails_the_sweep_and_its_parent_run(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys):
    with pytest.raises(SystemExit) as exit_:  # every trial diverges
        _sweep(monkeypatch, tmp_path, _overrides(
            tmp_path, tiny_cifar, tracking_uri, "schedule.eta_max=1e6",
            "hydra.sweeper.stages=[{n_trials: 2}, {n_trials: 2}]"))
    assert exit_.value.code == 1
    assert "sweep FAILED: stage 0: none of its 2 trials completed" in capsys.readouterr().err
    studies = _studies(tmp_path)
    assert "stage1" not in studies, "no stage after it"
    assert len(_counted(studies["stage0"])) == 2
    client, parent, _ = _parent_and_children(tracking_uri)
    assert parent.info.status == "FAILED"
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_resuming_a_study_with_another_search_is_refused_but_a_budget_may_grow(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys):
    stages = "hydra.sweeper.stages=[{n_trials: 2}, {n_trials: %d%s}]"
    _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri,
                                             stages % (1, ""), "hydra.sweeper.final=null"))
    changes = {
        "top_k 3 -> 5": ["hydra.sweeper.top_k=5"],
        "space {'lam': 'log[1e-05, 0.1]'} -> {'lam': 'log[0.0001, 0.1]'}":
            ["hydra.sweeper.params.lam='tag(log, interval(1e-4, 1e-1))'"],
        "stage 1 overrides [] -> ['schedule.cycles=2']":
            [stages % (1, ", overrides: ['schedule.cycles=2']")],
        "stage 0 n_trials 2 -> 1 (a budget may grow, not shrink)":
            ["hydra.sweeper.stages=[{n_trials: 1}, {n_trials: 1}]"],
        "stage 0 n_trials 2 -> 3 (stage 1 already started":
            ["hydra.sweeper.stages=[{n_trials: 3}, {n_trials: 1}]"],
    }
    for i, (diff, change) in enumerate(changes.items()):
        with pytest.raises(SystemExit) as exit_:
            _sweep(monkeypatch, tmp_path, _overrides(
                tmp_path, tiny_cifar, tracking_uri, stages % (1, ""),
                "hydra.sweeper.final=null", *change), run_dir=f"changed{i}")
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"hydra.sweeper.study_name='{STUDY}'" in err
        assert diff in err and "study_name=NEW_NAME" in err
    assert [len(_counted(s)) for s in _studies(tmp_path).values() if s.trials] == [2, 1]

    _sweep(monkeypatch, tmp_path, _overrides(tmp_path, tiny_cifar, tracking_uri,
                                             stages % (2, ""), "hydra.sweeper.final=null"),
           run_dir="grown")
    studies = _studies(tmp_path)
    assert (len(_counted(studies["stage0"])), len(_counted(studies["stage1"]))) == (2, 2)


def test_a_trial_is_seeded_by_the_number_it_got_so_workers_asking_at_once_differ(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    # another worker asks for trial 0 between this worker's look at the study and its
    # own ask; both use the shipped random sampler with seed 0
    real_ask, other_lam = optuna.Study.ask, []

    def ask_after_another_worker(study, fixed_distributions=None):
        if study.study_name.endswith(".stage0") and not other_lam:
            other = optuna.load_study(study_name=study.study_name, storage=study._storage,
                                      sampler=optuna.samplers.RandomSampler(
                                          seed=trial_seed(0, 0, 0)))
            trial = real_ask(other)
            other_lam.append(trial.suggest_float("lam", 1e-5, 1e-1, log=True))
            other.tell(trial, 0.5)
        return real_ask(study, fixed_distributions)

    monkeypatch.setattr(optuna.Study, "ask", ask_after_another_worker)
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.stages=[{n_trials: 2}]",
        "hydra.sweeper.final=null"))
    other, mine = _studies(tmp_path)["stage0"].trials
    assert other.params["lam"] == other_lam[0] and mine.number == 1
    assert mine.params["lam"] != other.params["lam"], "not the other worker's draw"
    expected = optuna.samplers.RandomSampler(seed=trial_seed(0, 0, 1))
    study = optuna.create_study(sampler=expected)
    assert mine.params["lam"] == study.ask().suggest_float("lam", 1e-5, 1e-1, log=True)


# --- real worker processes -------------------------------------------------------------

@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_sharing_a_storage_split_the_budget_and_lose_no_run(
        tmp_path, tiny_cifar, tracking_uri, start_worker, storage):
    # trials of ~5 s on an idle machine (n_s=300 took 1 s, and a worker starting 2.6 s
    # after the other found stage 0 done): the later worker still finds work
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri, "schedule.n_s=1500",
                           "hydra.sweeper.stages=[{n_trials: 3}, {n_trials: 2}]",
                           storage=storage)
    workers = [start_worker(overrides, f"worker{i}") for i in range(2)]
    for proc, log in workers:
        assert proc.wait(timeout=240) == 0, log.read_text()
    text = "".join(log.read_text() for _, log in workers)
    assert "database is locked" not in text.lower()

    studies = _studies(tmp_path, storage)
    budgets = {"stage0": 3, "stage1": 2, "final": 1}
    assert {k: len(_counted(studies[k])) for k in budgets} == budgets
    workers_seen = {t.user_attrs["worker"] for s in budgets for t in _counted(studies[s])}
    assert len(workers_seen) == 2, "both workers ran trials"
    assert all("dropped" in t.user_attrs for s in budgets for t in studies[s].trials
               if t.state == TrialState.FAIL and "failure" not in t.user_attrs), \
        "a trial that does not count says why"
    _, parent, children = _parent_and_children(tracking_uri)
    done = sorted((r.data.tags["stage"], int(r.data.tags["trial"])) for r in children
                  if r.info.status == "FINISHED")
    assert done == sorted((k.removeprefix("stage"), t.number)
                          for k in budgets for t in _counted(studies[k]))


def test_two_workers_choosing_in_the_last_stage_agree_on_one_winner_and_retrain_it_once(
        tmp_path, tiny_cifar, tracking_uri, start_worker):
    # trials of ~2 s: a worker starting seconds after the other still finds work
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri, "schedule.n_s=600",
                           "hydra.sweeper.stages=[{n_trials: 3}]",
                           "hydra.sweeper.final.top_m=2", "hydra.sweeper.final.seeds=2",
                           "hydra.sweeper.final.choose_in=last_stage")
    workers = [start_worker(overrides, f"worker{i}") for i in range(2)]
    for proc, log in workers:
        assert proc.wait(timeout=240) == 0, log.read_text()

    studies = _studies(tmp_path)
    _, winner, _ = _chose_between_the_best_two(studies)  # each slot once, either worker
    for _, log in workers:
        said = [line for line in log.read_text().splitlines() if "final: chose " in line]
        assert len(said) == 1 and f"final: chose {{'lam': {winner}}}" in said[0], \
            "each worker names the same winner"
    workers_seen = {t.user_attrs["worker"] for s in ("stage0", "choose", "final")
                    for t in _counted(studies[s])}
    assert len(workers_seen) == 2, "both workers ran trials"
    _, parent, _ = _parent_and_children(tracking_uri)
    assert parent.data.tags["best.lam"] == str(winner)


def test_a_warm_start_runs_the_given_points_first_and_not_again_on_resume(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.final=null",
                           "hydra.sweeper.stages=[{n_trials: 3}]",
                           "hydra.sweeper.warm_start=[{lam: 0.004}, {lam: 0.0003}]")
    _sweep(monkeypatch, tmp_path, overrides)
    stage0 = _studies(tmp_path)["stage0"]
    assert [t.params["lam"] for t in stage0.trials[:2]] == [0.004, 0.0003]
    assert len(_counted(stage0)) == 3, "the given points count towards the budget"

    overrides[overrides.index("hydra.sweeper.stages=[{n_trials: 3}]")] = \
        "hydra.sweeper.stages=[{n_trials: 4}]"  # a resume that grows the stage
    _sweep(monkeypatch, tmp_path, overrides, run_dir="resumed")
    stage0 = _studies(tmp_path)["stage0"]
    lams = [t.params["lam"] for t in stage0.trials]
    assert len(_counted(stage0)) == 4 and lams.count(0.004) == lams.count(0.0003) == 1


@pytest.mark.parametrize("points, message", [
    ("[{lam: 5.0}]", "hydra.sweeper.warm_start[0].lam=5.0: allowed a number in log["),
    ("[{lr: 0.1}]", "hydra.sweeper.warm_start[0]={'lr': 0.1}: give a value for each"),
])
def test_a_warm_start_point_outside_the_search_stops_it_before_anything_is_recorded(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys, points, message):
    _refused(monkeypatch, tmp_path, capsys, tracking_uri, message, _overrides(
        tmp_path, tiny_cifar, tracking_uri, f"hydra.sweeper.warm_start={points}"))


def _refused(monkeypatch, tmp_path, capsys, tracking_uri, message, overrides):
    """The sweep exits 2 with `message` before anything is recorded."""
    with pytest.raises(SystemExit) as exit_:
        _sweep(monkeypatch, tmp_path, overrides)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert _no_runs(tracking_uri)


def _trials(studies) -> dict:
    """(stage, number) -> (params, value) of every counted trial."""
    return {(name, t.number): (t.params, t.value) for name, study in studies.items()
            if name != "sweep" for t in _counted(study)}


def test_trials_run_in_parallel_workers_with_the_planned_threads_and_the_same_results(
        tmp_path, tiny_cifar, empty_mlflow_db, start_worker):
    # one sweep with two workers (the second started by the sweep itself), one with a
    # single worker, each in a folder of its own, same seed
    searches = {}
    for name, workers in (("parallel", 2), ("serial", 1)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(empty_mlflow_db, folder / "mlflow.db")
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        overrides = [*_overrides(folder, tiny_cifar, uri, "schedule.n_s=300",
                                 "hydra.sweeper.stages=[{n_trials: 4}, {n_trials: 3}]"),
                     f"hydra.sweeper.workers={workers}"]
        proc, log = start_worker(overrides, name)
        assert proc.wait(timeout=240) == 0, log.read_text()
        searches[name] = (folder, uri, log)

    folder, uri, log = searches["parallel"]
    studies = _studies(folder)
    helper_log = tmp_path / "parallel" / "worker1" / "worker.log"
    assert "worker 1 started" in log.read_text() and helper_log.exists()
    assert "final: chose" in log.read_text() and "final: chose" not in \
        helper_log.read_text(), "the worker that started the other one sums up"
    workers_seen = {t.user_attrs["worker"] for s in ("stage0", "stage1")
                    for t in _counted(studies[s])}
    assert len(workers_seen) == 2, "both workers ran trials"
    assert _trials(studies) == _trials(_studies(searches["serial"][0])), \
        "the same seed gives the same trials, whichever worker ran them"

    plan = _parallel.plan(threads.available_cores(), 2, 1, _parallel.BASIC_LAUNCHER)
    _, parent, children = _parent_and_children(uri)
    assert parent.info.status == "FINISHED" and parent.data.params["workers"] == "2"
    for run in children:  # read back inside the trial with threadpoolctl
        planned = plan.threads({"0": 4, "1": 3, "final": 1}[run.data.tags["stage"]])
        assert run.data.params["threads.eval"] == str(planned), run.data.tags


def test_a_killed_workers_running_trial_goes_stale_and_a_rerun_replaces_it(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, start_worker):
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri, "schedule.n_s=150",
                           "hydra.sweeper.stages=[{n_trials: 3}]", "hydra.sweeper.final=null")
    proc, _ = start_worker(overrides, "killed")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it mid-trial, after one finished
        time.sleep(0.2)
        stage = _studies(tmp_path).get("stage0") if (tmp_path / "optuna.log").exists() else None
        states = [t.state for t in stage.trials] if stage else []
        if TrialState.COMPLETE in states and states[-1] == TrialState.RUNNING:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _studies(tmp_path)["stage0"].trials[-1]
    assert killed.state == TrialState.RUNNING, "the killed worker left a running trial"
    kept = {t.number: t.value for t in _counted(_studies(tmp_path)["stage0"])}

    _sweep(monkeypatch, tmp_path, overrides, run_dir="rerun")
    stage = _studies(tmp_path)["stage0"]
    assert stage.trials[killed.number].state == TrialState.FAIL
    assert "failure" not in stage.trials[killed.number].user_attrs  # not counted
    counted = {t.number: t.value for t in _counted(stage)}
    assert len(counted) == 3 and all(counted[n] == v for n, v in kept.items())
    assert not math.isnan(sum(counted.values()))


def test_the_submitit_launcher_runs_each_trial_in_a_process_of_its_own(
        tmp_path, tiny_cifar, tracking_uri, start_worker):
    proc, log = start_worker(_overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.stages=[{n_trials: 2}]",
        "hydra.sweeper.final=null", "hydra/launcher=submitit_local",
        "hydra.sweeper.n_jobs=2"), "submitit")
    assert proc.wait(timeout=240) == 0, log.read_text()
    # submitit names each job's folder after the process it started for the job
    jobs = {int(p.name) for p in (tmp_path / "submitit" / ".submitit").iterdir()
            if p.name.isdigit()}
    assert len(jobs) == 2 and proc.pid not in jobs
    _, _, children = _parent_and_children(tracking_uri)
    assert sorted((r.data.tags["trial"], r.info.status) for r in children) == \
        [("0", "FINISHED"), ("1", "FINISHED")]


# --- what a search learned: carried forward, warm starts from a study ----------------

def test_a_later_stage_that_trains_alike_learns_from_the_earlier_trials_without_counting_them(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    overrides = _overrides(tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.final=null",
                           "hydra.sweeper.sampler={_target_: optuna.samplers.TPESampler, "
                           "n_startup_trials: 2}",
                           "hydra.sweeper.stages=[{n_trials: 4}, {n_trials: 3}, "
                           "{n_trials: 3, overrides: ['schedule.cycles=3']}]")
    _sweep(monkeypatch, tmp_path, overrides)
    studies = _studies(tmp_path)
    stage1 = studies["stage1"].trials
    carried = [t for t in stage1 if "carried_from" in t.user_attrs]
    span = studies["stage1"].user_attrs["space"]["lam"]
    # stage 0's complete trials inside stage 1's narrowed span: its top 3 at least
    assert len(carried) >= 3 and all(t.state == TrialState.COMPLETE for t in carried)
    assert {t.params["lam"] for t in carried} <= {t.params["lam"] for t in
                                                  studies["stage0"].trials}, span
    assert len(_counted(studies["stage1"])) - len(carried) == 3, "not counted in the budget"
    # stage 2 trains 3 cycles, not 2: its objective differs, nothing is carried
    assert not any("carried_from" in t.user_attrs for t in studies["stage2"].trials)
    _, _, children = _parent_and_children(tracking_uri)
    assert len(children) == 4 + 3 + 3, "carried trials are not run again"


def test_a_random_search_carries_nothing_forward_the_reports_protocol_is_kept(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    _sweep(monkeypatch, tmp_path, _overrides(
        tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.final=null",
        "hydra.sweeper.stages=[{n_trials: 3}, {n_trials: 2}]"))  # lambda_c2f: random
    assert not any("carried_from" in t.user_attrs for t in _studies(tmp_path)["stage1"].trials)


def test_a_warm_start_from_another_study_runs_its_best_trials_first(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys):
    first = _overrides(tmp_path, tiny_cifar, tracking_uri, "hydra.sweeper.final=null",
                       "hydra.sweeper.stages=[{n_trials: 4}]")
    _sweep(monkeypatch, tmp_path, first)
    best = [t.params["lam"] for t in _best(_studies(tmp_path)["stage0"], 2)]
    second = [o.replace(f"study_name={STUDY}", "study_name=warm") for o in first] + [
        f"hydra.sweeper.warm_start=[{{study: {STUDY}.stage0, top: 2}}]",
        "hydra.sweeper.stages=[{n_trials: 3}]"]
    _sweep(monkeypatch, tmp_path, second, run_dir="warm")
    store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "optuna.log")))
    warm = optuna.load_study(study_name="warm.stage0", storage=store)
    assert [t.params["lam"] for t in warm.trials[:2]] == best

    second[-2] = "hydra.sweeper.warm_start=[{study: nosuch}]"
    with pytest.raises(SystemExit) as exit_:
        _sweep(monkeypatch, tmp_path, [o.replace("study_name=warm", "study_name=w2")
                                       for o in second], run_dir="bad")
    assert exit_.value.code == 2
    assert "no study 'nosuch' in that storage; allowed ['c2f', 'c2f.stage0'" in \
        capsys.readouterr().err


# --- several objectives -----------------------------------------------------------------

def _two_objectives(tmp_path, tiny_cifar, tracking_uri, *extra):
    return _overrides(tmp_path, tiny_cifar, tracking_uri,
                      "hydra.sweeper.direction=[maximize,minimize]",
                      "hydra.sweeper.objectives=[val_acc,n_params]",
                      "hydra.sweeper.sampler=tpe", "model.layers=choice([4],[8],[16])",
                      "hydra.sweeper.stages=[{n_trials: 6}]",
                      "hydra.sweeper.final.front_tolerance=0.05", *extra)


def test_several_objectives_give_a_pareto_front_on_the_parent_and_retrain_the_rules_pick(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri):
    from hydra_plugins.mlplab_optuna_sweeper._rules import front_pick, pareto_front

    # Ctrl-C in the fifth trial, then a resume
    overrides = _two_objectives(tmp_path, tiny_cifar, tracking_uri)
    _raise_at_call(monkeypatch, 5, KeyboardInterrupt())
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _sweep(monkeypatch, tmp_path, overrides)
    assert len(_counted(_studies(tmp_path)["stage0"])) == 4
    monkeypatch.undo()
    _sweep(monkeypatch, tmp_path, overrides, run_dir="resumed")
    studies = _studies(tmp_path)
    assert len(_counted(studies["stage0"])) == 6
    directions = ["maximize", "minimize"]
    front = pareto_front(studies["stage0"].trials, directions)
    picked = front_pick(front, directions, 0.05)
    assert {t.number for t in front} == {t.number for t in studies["stage0"].best_trials}
    client, parent, children = _parent_and_children(tracking_uri)  # one parent
    assert parent.data.tags["front"] == " ".join(str(t.number) for t in front)
    table = Path(client.download_artifacts(parent.info.run_id, "pareto_front.csv",
                                           str(tmp_path)))
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert [int(r["number"]) for r in rows] == [t.number for t in front]
    assert {"pareto_front.png", "trials.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    final = [c for c in children if c.data.tags.get("stage") == "final"]
    assert len(final) == 1 and final[0].data.params["lam"] == str(picked.params["lam"])
    assert parent.data.tags["best.model.layers"] == picked.params["model.layers"]
    assert "final_test_acc" in parent.data.metrics


@pytest.mark.parametrize("extra, message", [
    ("hydra.sweeper.pruner=median", "pruner='median': Optuna cannot prune a study of "
                                    "several objectives"),
    ("hydra.sweeper.final.top_m=2", "final.top_m=2: with several objectives"),
    ("hydra.sweeper.objectives=[val_acc]", "objectives=['val_acc']: one per direction"),
])
def test_what_several_objectives_cannot_do_is_refused_before_anything_is_recorded(
        monkeypatch, tmp_path, tiny_cifar, tracking_uri, capsys, extra, message):
    _refused(monkeypatch, tmp_path, capsys, tracking_uri, message,
             _two_objectives(tmp_path, tiny_cifar, tracking_uri, extra))

"""mlplab's sweeper on a Hydra app that is not mlplab's: a ten-line task that returns a
plain float, as Hydra's own Optuna sweeper expects (mlplab.trial is the contract)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

APP = '''\
import hydra


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg) -> float:
    if cfg.y > 1.5:
        raise ValueError(f"y={cfg.y} is outside this app's range")
    return -(cfg.x - 2.0) ** 2 - (cfg.y - 1.0) ** 2


main()
'''

CONFIG = """\
defaults:
  - override hydra/sweeper: mlplab_optuna
  - _self_
x: 0.0
y: 0.0
seed: 0
hydra:
  sweeper:
    sampler: random
    seed: 0
    workers: 1
    params:
      x: tag(log, interval(0.1, 4))
      y: interval(0, 2)
    stages: [{n_trials: 6}, {n_trials: 4}]
"""


@pytest.fixture
def app(tmp_path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "config.yaml").write_text(CONFIG)
    assert len([line for line in APP.splitlines() if line.strip()]) <= 10
    return tmp_path


def _sweep(app: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "app.py", "--multirun", *overrides], cwd=app,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_foreign_app_returning_a_float_is_searched_in_stages(app):
    done = _sweep(app)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{app / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "app"]
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("mlplab.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    table = app / "trials.csv"
    client.download_artifacts(parent.info.run_id, "trials.csv", str(app))
    rows = list(csv.DictReader(table.open()))
    assert [r["stage"] for r in rows] == ["0"] * 6 + ["1"] * 4
    for r in rows:
        x, y = float(r["x"]), float(r["y"])
        if y > 1.5:  # the app raised: a FAIL trial, and the sweep went on
            assert r["state"] == "FAIL" and r["value"] == ""
        else:  # the float the app returned is the trial's value
            assert r["state"] == "COMPLETE"
            assert float(r["value"]) == pytest.approx(-(x - 2) ** 2 - (y - 1) ** 2)
    stage1 = [float(r["x"]) for r in rows if r["stage"] == "1"]
    best0 = sorted((r for r in rows if r["stage"] == "0" and r["value"]),
                   key=lambda r: -float(r["value"]))[:3]
    xs = [float(r["x"]) for r in best0]
    assert all(min(xs) <= x <= max(xs) for x in stage1), "log x narrowed to stage 0's best 3"
    assert any(r["state"] == "FAIL" for r in rows), "the seed samples y > 1.5 at least once"
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == sum(r["state"] == "FAIL" for r in rows)
    assert all("outside this app's range" in r.data.tags["failure"] for r in failed)


def test_a_pruner_is_refused_for_an_app_without_a_trial_section(app):
    done = _sweep(app, "hydra.sweeper.pruner=median")
    assert done.returncode == 2
    assert "hydra.sweeper.pruner='median'" in done.stderr
    assert "no `trial` section" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_final_step_retrains_with_the_seed_key_the_app_names(app):
    config = app / "config.yaml"
    config.write_text(CONFIG + "    final: {seeds: 2, seed_key: seed}\n")
    done = _sweep(app)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{app / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("app").experiment_id],
                                  "tags.`mlplab.sweep` = 'true'")
    client.download_artifacts(parent.info.run_id, "trials.csv", str(app))
    final = [r for r in csv.DictReader((app / "trials.csv").open()) if r["stage"] == "final"]
    assert sorted(r["seed"] for r in final) == ["0", "1"]
    assert parent.data.metrics["final_val_acc_sd"] == 0.0  # this app ignores its seed

    config.write_text(CONFIG + "    final: {seeds: 2}\n")
    refused = _sweep(app)
    assert refused.returncode == 2
    assert "hydra.sweeper.final.seed_key='train.seed': the app's config has no such int " \
        "key" in refused.stderr

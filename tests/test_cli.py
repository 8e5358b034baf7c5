"""The command line as users run it: python train.py ... in their own folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from mlplab import trainer
from mlplab.commands import train as train_command
from tests.conftest import REPO

TINY = ["model.layers=[8]", "train.batch_size=10", "schedule.n_s=6", "train.progress=false"]


@pytest.fixture
def run_cli(tmp_path, cli_env):
    def _run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                              env=cli_env, capture_output=True, text=True, timeout=300)

    return _run


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps])


def test_train_py_records_in_mlflow_db_where_the_user_runs_it(run_cli, tmp_path):
    done = run_cli(*TINY)
    assert done.returncode == 0, done.stderr
    assert "accuracy  train" in done.stdout and "mlflow ui --backend-store-uri" in done.stdout
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    [run] = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert "model.layers=[8]" in run.data.tags["hydra_overrides"]


def test_bad_value_exits_with_a_message_naming_the_key_and_records_nothing(run_cli, tmp_path):
    done = run_cli(*TINY, "lam=-1")
    assert done.returncode == 2
    assert "lam=-1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_diverging_run_ends_cleanly_marked_failed(run_cli, tmp_path):
    done = run_cli(*TINY, "schedule.eta_max=1e8")
    assert done.returncode == 1
    assert "run FAILED" in done.stderr and "diverged" in done.stderr
    assert "Traceback" not in done.stderr
    [run] = _runs(tmp_path)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["failure"]


def test_a_diverging_run_does_not_bring_down_a_multirun(run_cli, tmp_path):
    done = run_cli("--multirun", *TINY, "schedule.eta_max=0.1,1e8,0.05")
    assert done.returncode == 0, done.stderr
    statuses = sorted(r.info.status for r in _runs(tmp_path))
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"),
                                           (RuntimeError, "FAILED")])
def test_interrupt_and_crash_keep_what_was_measured_and_set_the_status(
        make_cfg, tracking_uri, monkeypatch, error, status):
    def crashing_train(*args, on_eval, **kwargs):
        on_eval({"step": 0, "epoch": 0.0, "train_loss": 2.3, "lr": 0.1})
        raise error()

    monkeypatch.setattr(trainer, "train", crashing_train)
    with pytest.raises(error):
        train_command.run_experiment(make_cfg())
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == status
    assert run.data.metrics["train_loss"] == pytest.approx(2.3)

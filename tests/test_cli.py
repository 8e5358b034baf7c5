"""The command line as users run it: python train.py ... in their own folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from mlplab.app import store
from mlplab.commands import train as train_command
from mlplab.engine import trainer
from tests.conftest import REPO

TINY = ["model.layers=[8]", "train.batch_size=10", "schedule.n_s=6", "train.progress=false"]


@pytest.fixture
def run_cli(tmp_path, cli_env):
    def _run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                              env=cli_env, capture_output=True, text=True, timeout=300)

    return _run


def _runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with store.store_lock(uri):  # as mlplab's processes: not while one creates the store
        client = MlflowClient(uri)
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


def test_a_run_says_what_it_is_in_the_runs_list(run_cli, tmp_path):
    done = run_cli(*TINY, "lam=0.02", "train.seed=3")
    assert done.returncode == 0, done.stderr
    [run] = _runs(tmp_path)
    assert run.info.run_name == "3072-8-10 lam=0.02 seed=3"
    assert run.data.tags["mlflow.source.name"] == "train.py"  # the command, not a helper
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # a model-training experiment: the UI opens on its runs, not on the GenAI overview
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_processes_started_together_on_a_fresh_folder_all_record_their_runs(
        tmp_path, cli_env):
    # No mlflow.db yet: the first process creates it under a lock while the others
    # wait; unlocked, MLflow's table creation raced and left a store nothing could open.
    commands = [[*TINY, f"train.seed={seed}"] for seed in range(3)]
    commands.append(["--multirun", *TINY, "lam=0.01,0.02"])
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in commands]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    runs = _runs(tmp_path)
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}


def test_mlflow_is_not_imported_for_help_config_or_untracked_runs(tmp_path, cli_env):
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', *sys.argv[1:]]\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MLFLOW-IMPORTED' if 'mlflow' in sys.modules else 'MLFLOW-NOT-IMPORTED')\n"
    )
    for args in (["--help"], ["--cfg", "job"], [*TINY, "tracking.enabled=false"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=cli_env,
                              capture_output=True, text=True, timeout=300)
        assert "MLFLOW-NOT-IMPORTED" in done.stdout, (args, done.stdout, done.stderr)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_mistyped_experiment_stops_naming_the_available_ones(run_cli, tmp_path):
    done = run_cli(*TINY, "experiment=thre_layer_bn")
    assert done.returncode != 0
    assert "experiment/thre_layer_bn" in done.stderr and "three_layer_bn" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing else was trained instead


def test_an_unknown_key_added_with_plus_is_refused_naming_the_closest_key(run_cli, tmp_path):
    done = run_cli(*TINY, "+train.batchsize=50")
    assert done.returncode == 2
    assert "train.batchsize" in done.stderr and "did you mean train.batch_size" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert run_cli(*TINY, "+tags.note=free-form").returncode == 0  # tags take any key


def test_an_unusable_store_stops_the_run_with_one_line(run_cli):
    done = run_cli(*TINY, "tracking.uri=nosuchscheme://store")
    assert done.returncode == 1
    assert "tracking failed" in done.stderr and "nosuchscheme://store" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, "KILLED"),
                                            (signal.SIGTERM, "KILLED")])
def test_ctrl_c_or_kill_mid_training_closes_the_run_killed(tmp_path, cli_env, signum, status):
    # long enough to be interrupted while it trains
    args = [*TINY, "schedule.n_s=100000", "train.evals_per_cycle=1000"]
    # as from a terminal: a background job's shell may have set SIGINT to be ignored
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _metric_logged(tmp_path):
        time.sleep(0.5)
    time.sleep(3)  # the run is open: let it evaluate step 0 and train a while
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    [run] = _runs(tmp_path)
    assert run.info.status == status
    assert "train_loss" in run.data.metrics  # what was measured is kept


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _metric_logged(tmp_path) -> bool:
    """Whether the run is open in the store (metrics reach it every few seconds)."""
    # _runs reads under the store's lock, so never while the run creates the tables.
    # (Not here as well: a second flock on the same file from this process waits forever.)
    return (tmp_path / "mlflow.db").exists() and bool(_runs(tmp_path))

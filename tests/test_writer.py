"""The tracking writer process: what a training process can rely on when it crashes,
is interrupted, or points at a store that cannot be used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow import MlflowClient

from mlplab import app, trainer, writer, writer_process
from tests.conftest import REPO

TINY = ["model.layers=[8]", "train.batch_size=10", "train.progress=false"]


def _runs(uri: str):
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _wait_for(predicate, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_a_training_process_killed_mid_run_leaves_its_run_failed_not_running(
        tmp_path, tracking_uri):
    script = textwrap.dedent(f"""
        import os, signal
        from mlplab import writer
        run = writer.RemoteRun(uri={tracking_uri!r}, experiment="killed")
        run.log_metrics({{"train_loss": 2.3}}, 0)
        run.sync()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL
    [run] = _wait_for(lambda: [r for r in _runs(tracking_uri) if r.info.status != "RUNNING"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == writer_process.ORPHANED
    assert run.data.metrics["train_loss"] == pytest.approx(2.3)  # what was sent is kept


def test_ctrl_c_in_a_terminal_ends_the_run_killed(tmp_path, cli_env):
    # The terminal sends SIGINT to the whole foreground process group; the writer
    # must survive it to record the KILLED status.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _runs(uri)  # the store exists before the run: no race to create its tables
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY,
                             "schedule.n_s=200000"], cwd=tmp_path, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: _runs(uri), 120)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [run] = _runs(uri)
    assert run.info.status == "KILLED"


def test_a_store_that_cannot_be_opened_stops_the_run_before_training(
        make_cfg, monkeypatch):
    trained = []
    monkeypatch.setattr(trainer, "train", lambda *a, **k: trained.append(1))
    cfg = make_cfg("tracking.uri=nosuchscheme://store")
    with pytest.raises(writer.TrackingError, match="nosuchscheme://store"):
        app.run_experiment(cfg)
    assert not trained


def test_train_py_names_an_unusable_store_and_exits_non_zero(tmp_path, cli_env):
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "schedule.n_s=3",
                           "tracking.uri=nosuchscheme://store"], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "tracking failed" in done.stderr and "nosuchscheme://store" in done.stderr
    assert "Traceback" not in done.stderr


def test_tracking_disabled_trains_and_records_nothing(tmp_path, cli_env):
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "schedule.n_s=3",
                           "tracking.enabled=false"], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not tracked" in done.stdout and "accuracy  train" in done.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_runs_in_one_process_share_one_writer(make_cfg):
    first = app.run_experiment(make_cfg("schedule.n_s=3", "tracking.log_model=false"))
    pid = writer.start().process.pid
    second = app.run_experiment(make_cfg("schedule.n_s=3", "tracking.log_model=false"))
    assert writer.start().process.pid == pid and first.run_id != second.run_id


def test_a_trial_that_does_not_wait_is_complete_after_a_flush(make_cfg, tracking_uri):
    outcome = app.run_experiment(make_cfg("schedule.n_s=3"), wait=False)
    writer.flush()
    run = MlflowClient(tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert {"config.yaml", "curves.png"} <= {
        a.path for a in MlflowClient(tracking_uri).list_artifacts(outcome.run_id)}


def test_a_failure_after_an_unwaited_end_is_reported_not_raised_into_the_next_run(
        tracking_uri, capfd):
    first = writer.RemoteRun(uri=tracking_uri, experiment="unwaited")
    first.log_outputs("/nonexistent/folder", [], "t", (32, 32, 3), ["a"] * 10)
    first.end("FINISHED", wait=False)
    second = writer.RemoteRun(uri=tracking_uri, experiment="unwaited")
    second.sync()
    second.end("FINISHED")  # no error of the first run's here
    writer.flush()
    err = capfd.readouterr().err
    assert f"run {first.run_id} was not fully recorded" in err
    assert "could not log the figures and the model" in err
    statuses = {r.info.run_id: r.info.status for r in _runs(tracking_uri)}
    assert statuses == {first.run_id: "FAILED", second.run_id: "FINISHED"}


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (OSError, "FAILED")])
def test_an_error_after_training_closes_the_run_and_the_next_run_still_records(
        make_cfg, tracking_uri, monkeypatch, error, status):
    def failing_outputs(*args, **kwargs):
        raise error()

    with monkeypatch.context() as patch:
        patch.setattr(app, "_log_outputs", failing_outputs)
        with pytest.raises(error):
            app.run_experiment(make_cfg("schedule.n_s=3", "tracking.run_name=first"))
    second = app.run_experiment(make_cfg("schedule.n_s=3", "tracking.run_name=second",
                                         "tracking.log_model=false"))
    statuses = {r.info.run_name: r.info.status for r in _runs(tracking_uri)}
    assert statuses == {"first": status, "second": "FINISHED"}
    assert second.run_id

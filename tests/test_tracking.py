"""Where runs go, and how the config becomes MLflow params."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlplab.app import store, tracking


def test_uri_defaults_to_mlflow_db_in_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store.resolve_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_environment_then_config_override_the_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.resolve_uri(None) == "http://127.0.0.1:5000"
    assert store.resolve_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_sqlite_store_keeps_artifacts_in_mlruns_beside_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store.artifact_location(uri, "dd2424") == (tmp_path / "mlruns/dd2424").as_uri()
    assert store.artifact_location(uri, "a b/c") == (tmp_path / "mlruns/a_b_c").as_uri()
    assert store.artifact_location("http://127.0.0.1:5000", "x") is None


def test_nested_config_flattens_to_dotted_params():
    flat = tracking.flatten({"model": {"layers": [50, 50], "init": "he"}, "lam": 0.01})
    assert flat == {"model.layers": "[50, 50]", "model.init": "he", "lam": "0.01"}


def test_writes_are_retried_while_the_database_is_locked(monkeypatch):
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert store.with_retries(flaky) == "ok" and len(calls) == 3


def test_other_errors_are_not_retried():
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("no such column")

    with pytest.raises(ValueError):
        store.with_retries(broken)
    assert len(calls) == 1


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    assert tracking.git_commit(tmp_path) is None
    assert tracking.git_commit(Path(__file__).parent)  # this repository


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"),
                                           (ZeroDivisionError, "FAILED")])
def test_the_run_context_closes_the_run_with_its_outcome_keeping_metrics(
        tracking_uri, tmp_path, error, status):
    from mlflow import MlflowClient

    with contextlib.suppress(KeyboardInterrupt, ZeroDivisionError), \
            tracking.run(uri=tracking_uri, experiment="outcomes", spool_root=tmp_path,
                         wait_seconds=60) as run:
        run.log_metrics({"train_loss": 2.5}, step=0)
        run.log_metrics({"train_loss": 1.5}, step=10)
        if error:
            raise error("stopped here")
    record = MlflowClient(tracking_uri).get_run(run.run_id)
    assert record.info.status == status
    history = MlflowClient(tracking_uri).get_metric_history(run.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.5), (10, 1.5)]
    if status == "FAILED":
        assert record.data.tags["failure"] == "ZeroDivisionError: stopped here"
    else:
        assert "failure" not in record.data.tags
    assert run.pending == 0 and not run.spool.folder.exists(), "delivered: no spool left"


def test_an_unusable_store_is_a_tracking_error_naming_it(tmp_path):
    with pytest.raises(store.TrackingError, match="nosuchscheme://store"), \
            tracking.run(uri="nosuchscheme://store", experiment="x", spool_root=tmp_path):
        pass


def test_a_tracked_run_works_where_fcntl_does_not_exist(tmp_path):
    """Windows has no fcntl: the store's lock and the run's spool use filelock's own."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "\n".join([
        "import sys, warnings",
        "sys.modules['fcntl'] = None  # `import fcntl` now raises ImportError",
        "warnings.simplefilter('ignore')  # filelock says it falls back to its own lock",
        "from mlplab.app import tracking",
        f"with tracking.run(uri={uri!r}, experiment='nofcntl', spool_root={str(tmp_path)!r},",
        "                  wait_seconds=60) as run:",
        "    run.log_metrics({'x': 1.0}, step=0)",
        "assert run.pending == 0, run.pending",
        "print(run.run_id)"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert MlflowClient(uri).get_run(done.stdout.strip()).info.status == "FINISHED"


def test_a_record_delivered_late_does_not_overwrite_a_newer_end(tmp_path):
    """An interrupted run's spool (KILLED) delivered after the run was resumed and
    finished leaves it FINISHED."""
    from mlflow import MlflowClient

    from mlplab.app import spool

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.open_experiment(uri, "late")
    old = spool.Spool(tmp_path, "resumed-run", uri, "late")
    old.end("KILLED")  # the first attempt, interrupted; its spool stays on disk
    time.sleep(0.01)  # end times are in milliseconds: the resumed run ends later
    new = spool.Spool(tmp_path, "resumed-run", uri, "late")
    new.end("FINISHED")
    state = spool.deliver(new.folder)
    spool.deliver(old.folder)
    run = MlflowClient(uri).get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert len(MlflowClient(uri).search_runs([state["experiment_id"]])) == 1


def test_a_record_the_store_refuses_is_set_aside_and_the_others_go_on(tmp_path, caplog):
    from mlflow import MlflowClient

    from mlplab.app import courier

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.run(uri=uri, experiment="refused", spool_root=tmp_path,
                      wait_seconds=60) as bad:
        bad.log_metrics({"no good!": 1.0}, step=0)  # MLflow refuses the name
    with tracking.run(uri=uri, experiment="refused", spool_root=tmp_path,
                      wait_seconds=60) as good:
        good.log_metrics({"fine": 1.0}, step=0)
    assert good.pending == 0 and MlflowClient(uri).get_run(good.run_id).data.metrics == \
        {"fine": 1.0}
    [aside] = list(tmp_path.glob(f"**/*{courier.REJECTED}"))
    assert "no good!" in (aside / "rejected.txt").read_text()
    assert "refused a run's record" in caplog.text


def test_a_create_sent_twice_leaves_one_run(tmp_path, monkeypatch):
    """MLflow's HTTP client retries a create whose answer was lost: the spool keeps one
    run of the two the store made."""
    from mlflow import MlflowClient

    from mlplab.app import spool

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = store.client(uri)
    real_create = client.create_run

    def create_twice(*args, **kwargs):
        real_create(*args, **kwargs)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(client, "create_run", create_twice)
    kept = spool.Spool(tmp_path, "sent-twice", uri, "twice")
    kept.metrics({"x": 1.0}, step=0)
    kept.end("FINISHED")
    state = spool.deliver(kept.folder)
    [run] = MlflowClient(uri).search_runs([state["experiment_id"]])
    assert run.info.run_id == state["run_id"] and run.data.metrics == {"x": 1.0}


def test_models_logged_before_the_app_folder_find_their_class_by_its_old_name():
    import pickle

    from mlplab.app.pyfunc_model import ImageClassifier

    # what a pickle of the class written before the move names: mlplab.pyfunc_model
    assert pickle.loads(b"cmlplab.pyfunc_model\nImageClassifier\n.") is ImageClassifier

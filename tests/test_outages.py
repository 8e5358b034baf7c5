"""Nothing lost when the MLflow store is away: a real `mlflow server` (SQLite behind it,
artifacts served over HTTP) stopped in the middle of a run or a sweep and started
again on the same port and store; what a run kept on disk delivered exactly once,
even by a sync killed half way. The server tests are marked `servers`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from mlplab.app import spool, store
from tests.conftest import REPO, skip_or_fail
from tests.test_servers import MlflowServer, Unavailable, _all_runs, tiny_search

# the goals: MLPLAB_MLFLOW_OUTAGE_SECONDS=240 (and 1800) pytest -k outlives
OUTAGE = float(os.environ.get("MLPLAB_MLFLOW_OUTAGE_SECONDS", 8))
TINY = ["data.n_val=30", "train.batch_size=10", "model.layers=[8]", "train.progress=false",
        "schedule.n_s_k=null"]


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path)
    try:
        s.start()
    except Unavailable as err:
        skip_or_fail(str(err))
    yield s
    s.stop()


def _start(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    log = cwd / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd,
                                env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, log


def _wait_for(condition, what: str, proc=None, log: Path | None = None, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc is None or proc.poll() is None, log.read_text() if log else what
        time.sleep(0.2)
    pytest.fail(f"never: {what}")


def _runs(url: str) -> list:
    return _all_runs(MlflowClient(url))


def _history(url: str, run_id: str, key: str) -> list[tuple]:
    return [(m.step, m.timestamp, m.value)
            for m in MlflowClient(url).get_metric_history(run_id, key)]


def _assert_whole(url: str, run, n_points: int) -> None:
    """FINISHED with every evaluation point once, its artifacts and its model."""
    client = MlflowClient(url)
    assert run.info.status == "FINISHED"
    steps = [s for s, _, _ in _history(url, run.info.run_id, "val_acc")]
    assert len(steps) == n_points and steps == sorted(set(steps)), steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png"} <= artifacts, artifacts
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.status.name for m in models] == ["READY"]
    assert run.info.end_time > run.info.start_time


@pytest.mark.servers
def test_a_run_outlives_an_mlflow_server_outage_and_ends_finished_with_everything(
        server, tmp_path, cli_env):
    """The server stopped while the run trains and started again before it ends: the
    run ends FINISHED with all its points, artifacts and model, exit status 0."""
    args = [*TINY, "schedule.n_s=400", "schedule.cycles=2", "train.evals_per_cycle=10",
            f"tracking.uri={server.url}"]
    proc, log = _start(args, tmp_path, cli_env)
    _wait_for(lambda: _runs(server.url), "the run reached the server", proc, log)
    server.stop()
    time.sleep(OUTAGE)
    server.start()
    assert proc.wait(timeout=600) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    [run] = _runs(server.url)
    _assert_whole(server.url, run, n_points=21)
    assert not list(tmp_path.glob(f"outputs/**/{spool.SPOOL_DIR}/*")), "delivered: no spool"


@pytest.mark.servers
def test_a_run_ending_while_the_store_is_away_says_so_in_one_line_and_sync_delivers_once(
        server, tmp_path, cli_env):
    args = [*TINY, "schedule.n_s=60", "schedule.cycles=2", "train.evals_per_cycle=10",
            f"tracking.uri={server.url}", "tracking.wait_seconds=2"]
    server.stop()  # away from the start: the run trains all the same
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 75, done.stderr  # EX_TEMPFAIL: trained, record kept
    assert "Traceback" not in done.stderr and "FAILED" not in done.stdout + done.stderr
    assert "accuracy  train" in done.stdout and "records wait for the store" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlplab: the MLflow store") and "mlplab-sync" in last, last
    folder = last.split("mlplab-sync ")[-1]

    server.start()
    sync = [sys.executable, "-m", "mlplab.commands.sync", folder]
    first = subprocess.run(sync, capture_output=True, text=True, env=cli_env, timeout=300)
    assert first.returncode == 0 and "1 runs delivered, 0 still waiting" in first.stdout, \
        first.stdout + first.stderr
    [run] = _runs(server.url)
    _assert_whole(server.url, run, n_points=21)
    before = _history(server.url, run.info.run_id, "val_acc")
    again = subprocess.run(sync, capture_output=True, text=True, env=cli_env, timeout=300)
    assert again.returncode == 0 and "0 runs delivered, 0 still waiting" in again.stdout
    assert _history(server.url, run.info.run_id, "val_acc") == before
    assert len(_runs(server.url)) == 1


@pytest.mark.servers
def test_a_sweep_goes_on_while_the_store_is_away_and_its_runs_arrive_with_sync(
        server, tmp_path, cli_env):
    """Every trial COMPLETE in Optuna though no MLflow write reached the store; after
    the sync, one parent run FINISHED with every trial and the final retrain under it."""
    server.stop()
    journal = tmp_path / "optuna.log"
    url, md5 = cli_env["MLPLAB_CIFAR10_URL"], cli_env["MLPLAB_CIFAR10_MD5"]
    args = ["--multirun", *tiny_search((url, md5), tmp_path / "data", "away"),
            f"hydra.sweeper.storage=journal:{journal}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"tracking.uri={server.url}", "tracking.wait_seconds=2"]
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 75, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "mlplab-sync" in done.stderr.strip().splitlines()[-1]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(journal)))
    for suffix, n in (("stage0", 3), ("stage1", 2), ("final", 1)):
        trials = optuna.load_study(study_name=f"away.{suffix}", storage=storage).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n, suffix

    server.start()
    sync = subprocess.run([sys.executable, "-m", "mlplab.commands.sync", str(tmp_path)],
                          capture_output=True, text=True, env=cli_env, timeout=300)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    runs = _runs(server.url)
    [parent] = [r for r in runs if r.data.tags.get("mlplab.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 6
    assert all(r.info.status == "FINISHED" for r in children)
    assert "trials.csv" in {a.path for a in MlflowClient(server.url).list_artifacts(
        parent.info.run_id)}


# --- delivery killed half way (a local store: no server needed) ---------------------------

def _kept_run(root: Path, uri: str, n_steps: int) -> Path:
    """A spool as a run leaves it when the store was away throughout: many metric
    steps and several artifacts, so a delivery takes a while."""
    kept = spool.Spool(root, "run-killed-sync", uri, "sync", run_name="kept",
                       tags={"mlplab.summary": "kept"})
    kept.params({"lam": "0.01", "model.layers": "[8]"})
    for step in range(n_steps):
        kept.metrics({f"m{i}": step * 0.5 + i for i in range(10)}, step)
        if step % (n_steps // 5) == 0:
            path = root / f"artifact{step}.txt"
            path.write_text("x" * 100_000)
            kept.artifact(path)
    kept.end("FINISHED")
    kept.release()  # as if its process had ended
    return kept.folder


def test_a_sync_killed_half_way_and_run_again_delivers_every_record_once(tmp_path, cli_env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.open_experiment(uri, "sync")  # the store made, as the run would have
    folder = _kept_run(tmp_path / spool.SPOOL_DIR, uri, n_steps=3000)
    ops = (folder / spool.OPS).read_text().splitlines()
    end_time = json.loads(ops[-1])["end_time"]
    sync = [sys.executable, "-m", "mlplab.commands.sync", str(tmp_path)]
    first = subprocess.Popen(sync, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = folder / spool.DELIVERED
    _wait_for(lambda: state.exists() and json.loads(state.read_text())["offset"] > 0,
              "the first sync started delivering", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert folder.exists() and json.loads(state.read_text())["offset"] < \
        (folder / spool.OPS).stat().st_size, "killed half way"
    again = subprocess.run(sync, env=cli_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "1 runs delivered, 0 still waiting" in again.stdout, \
        again.stdout + again.stderr
    assert not folder.exists()

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("sync").experiment_id])
    assert run.info.status == "FINISHED" and run.info.end_time == end_time
    assert run.data.params == {"lam": "0.01", "model.layers": "[8]"}
    for i in range(10):
        history = client.get_metric_history(run.info.run_id, f"m{i}")
        assert [m.step for m in history] == list(range(3000)), f"m{i}"
    assert len(client.list_artifacts(run.info.run_id)) == 5

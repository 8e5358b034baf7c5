"""Scale-out for real: PostgreSQL (Debian's packages) and an `mlflow server` on it,
started here on 127.0.0.1, and the lambda search run by worker processes against them,
one of them lost to SIGKILL; no password reaches a file. Marked `servers`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import free_port, skip_or_fail

pytestmark = pytest.mark.servers

USER = "mlplab"
DATABASES = ("mlflow", "optuna")
START_SECONDS = 180  # `mlflow server` on a busy 2-core machine takes 10-30 s, or more
BUDGETS = {"stage0": 3, "stage1": 2, "final": 1}
EXPERIMENT = "mlplab"  # tracking.experiment's default: where the workers' runs go


class Unavailable(RuntimeError):
    """A server cannot be started on this machine (the reason says why)."""


def pg_bin() -> Path | None:
    """PostgreSQL's server programs: Debian keeps them off PATH, in
    /usr/lib/postgresql/<version>/bin (the newest is taken)."""
    found = [d for d in Path("/usr/lib/postgresql").glob("*/bin")
             if (d / "initdb").exists() and (d / "pg_ctl").exists()]
    if found:
        return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@dataclass
class Postgres:
    port: int
    password: str  # the user's; kept in memory and in the environment only
    pg_ctl: list = None  # the server's control command, up to its action

    def url(self, database: str, password: bool = False) -> str:
        auth = f"{USER}:{self.password}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """As a restart does: connections are cut, new ones refused."""
        _run([*self.pg_ctl, "-m", "fast", "-w", "stop"], "pg_ctl stop")

    def start(self) -> None:
        _run([*self.pg_ctl, "-w", "-t", "60", "start"], "pg_ctl start")


def _run(cmd, what: str, **kwargs) -> None:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=120, **kwargs)
    if done.returncode != 0:
        raise Unavailable(f"{what} failed: {(done.stderr or done.stdout).strip()[-500:]}")


@contextmanager
def postgres() -> Iterator[Postgres]:
    """A throwaway cluster in a temporary folder, listening on 127.0.0.1 only (its
    socket in that folder): a user with a password (over TCP nothing else gets in),
    owning one database for MLflow and one for Optuna."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise Unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_owner = []  # initdb and the server refuse to run as root: as `postgres` then
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise Unavailable("running as root without runuser to start PostgreSQL as postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="mlplab-pg-"))
    data, port = folder / "data", free_port()
    try:
        if as_owner:
            try:
                shutil.chown(folder, "postgres", "postgres")
            except LookupError:
                raise Unavailable("no `postgres` system user to run PostgreSQL as") from None
        _run([*as_owner, bin_dir / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8",
              "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"], "initdb")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} "
                   f"-c unix_socket_directories={folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        pg_ctl = [*as_owner, bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log",
                  "-o", options]
        _run([*pg_ctl, "-w", "-t", "60", "start"], "pg_ctl start")
        try:
            pg = Postgres(port, secrets.token_urlsafe(16), pg_ctl)
            # the password goes in on stdin, never in a command line or a file
            sql = (f"CREATE ROLE {USER} LOGIN PASSWORD '{pg.password}';\n"
                   + "".join(f"CREATE DATABASE {db} OWNER {USER};\n" for db in DATABASES))
            _run([bin_dir / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", folder,
                  "-p", port, "-U", "postgres", "-d", "postgres"], "creating the user",
                 input=sql)
            yield pg
        finally:
            subprocess.run([*as_owner, bin_dir / "pg_ctl", "-D", data, "-m", "immediate",
                            "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on `backend` (default: SQLite in `folder`), serving the artifacts
    it keeps in folder/artifacts (workers reach them over HTTP only), on one port
    across stops and starts, as a restart of it does."""

    def __init__(self, folder: Path, backend: str | None = None, env: dict | None = None):
        self.folder, self.port = folder, free_port()
        self.backend = backend or f"sqlite:///{folder / 'server.db'}"
        self.env, self.url, self.proc = env, f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        log_path = self.folder / "mlflow-server.log"
        with open(log_path, "a") as log:  # the server keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 self.backend, "--serve-artifacts", "--artifacts-destination",
                 str(self.folder / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable("mlflow server did not start: "
                                      + log_path.read_text()[-1500:]) from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def mlflow_server(pg: Postgres, folder: Path) -> Iterator[str]:
    """`mlflow server` on PostgreSQL (password from PGPASSWORD). Yields its URL."""
    server = MlflowServer(folder, pg.url("mlflow"), {**os.environ, "PGPASSWORD": pg.password})
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Servers:
    pg: Postgres
    mlflow_url: str
    artifacts: Path  # the server's artifact folder


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    try:
        with postgres() as pg, mlflow_server(pg, folder) as url:
            yield Servers(pg, url, folder / "artifacts")
    except Unavailable as err:
        skip_or_fail(str(err))


def tiny_search(tiny_cifar, data_root: Path, study: str) -> list[str]:
    """The shipped lambda search on the tiny archive: 3 + 2 trials, then the final
    retrain (its model logged); heartbeats every second, stale after 6 s."""
    url, md5 = tiny_cifar
    return ["+search=lambda_c2f", f"data.url={url}", f"data.md5={md5}",
            f"data.root={data_root}", "data.n_val=30", "train.batch_size=10",
            "model.layers=[8]", "schedule.n_s=6", "schedule.n_s_k=null",
            f"hydra.sweeper.study_name={study}", "hydra.sweeper.stages.0.n_trials=3",
            "hydra.sweeper.stages.1.n_trials=2",
            "hydra.sweeper.final.overrides=['data.n_val=20','schedule.cycles=3',"
            "'tracking.log_model=true','tracking.log_plots=true']",
            "hydra.sweeper.workers=1",  # the test starts each worker itself
            "hydra.sweeper.heartbeat_seconds=1", "hydra.sweeper.stale_seconds=6"]


def _all_runs(client: MlflowClient, experiment: str | None = None) -> list:
    """Every run in the store, or in one experiment (none while it does not exist)."""
    ids = [e.experiment_id for e in client.search_experiments()
           if experiment is None or e.name == experiment]
    return client.search_runs(ids, max_results=1000) if ids else []


def _counted(study) -> list:
    return [t for t in study.trials if t.state == TrialState.COMPLETE
            or (t.state == TrialState.FAIL and "failure" in t.user_attrs)]


def _files_holding(secret: str, *folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*")
            if p.is_file() and secret.encode() in p.read_bytes()]


def _records_holding(secret: str, client: MlflowClient) -> list[str]:
    """Runs (and experiments) whose params or tags hold `secret`."""
    found = [f"experiment {e.name}" for e in client.search_experiments()
             if secret in json.dumps(e.tags)]
    return found + [f"run {r.info.run_name}" for r in _all_runs(client)
                    if secret in json.dumps([r.data.params, r.data.tags])]


def _wait_for_running_trial_run(client: MlflowClient, proc, log: Path) -> None:
    """Until the worker's first trial is training, its MLflow run RUNNING."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if any(r.info.status == "RUNNING" and r.data.tags.get("stage") == "0"
               for r in _all_runs(client, EXPERIMENT)):
            return
        time.sleep(0.3)
    pytest.fail("the first worker never started a trial: " + log.read_text()[-2000:])


def test_workers_on_postgresql_and_an_mlflow_server_share_the_search_and_survive_a_kill(
        servers, tmp_path, tiny_cifar, cli_env, start_worker):
    pg, study = servers.pg, "c2f_servers"
    search = tiny_search(tiny_cifar, tmp_path / "data", study)
    env = {**cli_env, "PGPASSWORD": pg.password, "MLFLOW_TRACKING_URI": servers.mlflow_url}
    storage = f"hydra.sweeper.storage={pg.url('optuna')}"
    client = MlflowClient(servers.mlflow_url)

    # a worker lost mid-trial: its trials train long; SIGKILL once one is under way
    lost, lost_log = start_worker([*search, storage, "schedule.n_s=20000"], "lost", env)
    _wait_for_running_trial_run(client, lost, lost_log)
    lost.kill()
    lost.wait()

    # two workers at once; one has the password in its storage URL, not in PGPASSWORD
    t0 = time.monotonic()
    workers = [
        start_worker([*search, storage], "worker1", env),
        start_worker([*search, f"hydra.sweeper.storage={pg.url('optuna', password=True)}"],
                     "worker2", {k: v for k, v in env.items() if k != "PGPASSWORD"})]
    for proc, log in workers:
        assert proc.wait(timeout=300) == 0, log.read_text()
    print(f"\n2 workers: {time.monotonic() - t0:.1f} s wall for the search")
    for _, log in workers:
        text = log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text

    # Optuna: every stage's budget met exactly; the lost trial released, not counted
    storage_url = pg.url("optuna", password=True)
    studies = {k: optuna.load_study(study_name=f"{study}.{k}", storage=storage_url)
               for k in BUDGETS}
    assert {k: len(_counted(s)) for k, s in studies.items()} == BUDGETS
    assert all(t.state == TrialState.COMPLETE for s in studies.values() for t in _counted(s))
    lost_trial = studies["stage0"].trials[0]  # the lost worker was alone at first
    assert lost_trial.state == TrialState.FAIL and "failure" not in lost_trial.user_attrs, \
        "released: it no longer counts"
    assert lost_trial.user_attrs["worker"] not in {
        t.user_attrs["worker"] for s in studies.values() for t in _counted(s)}

    # MLflow: one parent; every counted trial a FINISHED child; the lost one FAILED
    runs = _all_runs(client, EXPERIMENT)
    [parent] = [r for r in runs if r.data.tags.get("mlplab.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    children = {(r.data.tags["stage"], int(r.data.tags["trial"])): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    for key, s in studies.items():
        for t in _counted(s):
            assert children[(key.removeprefix("stage"), t.number)].info.status == "FINISHED"
    lost_run = children[("0", lost_trial.number)]
    assert (lost_run.info.status, lost_run.data.tags["failure"]) == ("FAILED", "worker lost")
    assert not [r.info.run_name for r in _all_runs(client) if r.info.status == "RUNNING"]

    # the final retrain's model and figures, downloaded through the server
    final = children[("final", _counted(studies["final"])[0].number)]
    assert final.info.artifact_uri.startswith("mlflow-artifacts:")  # served, not a path
    curves = mlflow.artifacts.download_artifacts(run_id=final.info.run_id,
                                                 artifact_path="curves.png",
                                                 dst_path=str(tmp_path / "downloads"),
                                                 tracking_uri=servers.mlflow_url)
    assert Path(curves).read_bytes().startswith(b"\x89PNG")
    [model] = [m for m in client.search_logged_models([final.info.experiment_id])
               if m.source_run_id == final.info.run_id]
    assert model.artifact_location.startswith("mlflow-artifacts:")
    model_dir = mlflow.artifacts.download_artifacts(
        model.artifact_location, dst_path=str(tmp_path / "model"),
        tracking_uri=servers.mlflow_url)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert mlflow.pyfunc.load_model(model_dir).predict(images).shape == (2,)
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "accuracy_vs_lam_stage0.png"} <= parent_files

    # no password on disk (sweep folders, logs, the server's artifacts) or in MLflow
    assert not _files_holding(pg.password, tmp_path, servers.artifacts)
    assert not _records_holding(pg.password, client)


def test_a_password_in_the_tracking_uri_reaches_the_trials_but_no_file(
        servers, tmp_path, tiny_cifar, cli_env, start_worker):
    # MLflow straight on PostgreSQL, the password in the URL only; trials run in
    # joblib's worker processes, which get the real URI from the environment
    secret_uri = servers.pg.url("mlflow", password=True)
    url, md5 = tiny_cifar
    proc, log = start_worker([
        "+search=lambda_c2f", f"data.url={url}", f"data.md5={md5}",
        f"data.root={tmp_path / 'data'}", "data.n_val=30", "train.batch_size=10",
        "model.layers=[8]", "schedule.n_s=6", "schedule.n_s_k=null",
        "hydra.sweeper.stages=[{n_trials: 2}]", "hydra.sweeper.final=null",
        f"hydra.sweeper.storage=journal:{tmp_path / 'optuna.log'}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
        f"tracking.uri={secret_uri}", "tracking.experiment=direct"], "sweep", cli_env)
    assert proc.wait(timeout=300) == 0, log.read_text()

    client = MlflowClient(secret_uri)
    experiment = client.get_experiment_by_name("direct")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and [r.info.status for r in trials] == ["FINISHED"] * 2
    masked = servers.pg.url("mlflow").replace(f"{USER}@", f"{USER}:***@")
    assert trials[0].data.params["tracking.uri"] == masked
    assert not _files_holding(servers.pg.password, tmp_path)
    assert not _records_holding(servers.pg.password, client)


def test_a_two_worker_search_waits_out_a_postgresql_restart_longer_than_stale_seconds(
        tmp_path, tiny_cifar, cli_env, start_worker):
    try:
        with postgres() as pg:
            _search_through_an_outage(pg, tmp_path, tiny_cifar, cli_env, start_worker)
    except Unavailable as err:
        skip_or_fail(str(err))


def _search_through_an_outage(pg, tmp_path, tiny_cifar, cli_env, start_worker):
    """PostgreSQL (the studies) stopped for 3x stale_seconds while both workers' first
    trials train, the MLflow store a local file: no trial lost, failed as stale or
    counted twice, and one complete parent run."""
    # the measurement: MLPLAB_PG_OUTAGE_SECONDS=90 pytest -k postgresql_restart
    study, outage = "c2f_outage", float(os.environ.get("MLPLAB_PG_OUTAGE_SECONDS", 18))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = [*tiny_search(tiny_cifar, tmp_path / "data", study), "schedule.n_s=300",
              f"hydra.sweeper.storage={pg.url('optuna')}", f"tracking.uri={tracking}"]
    env = {**cli_env, "PGPASSWORD": pg.password}
    # the store made before the workers start: this test's own reads, outside the
    # workers' lock, would otherwise race their creation of its tables
    client = MlflowClient(tracking)
    client.search_experiments()
    workers = [start_worker(search, f"worker{i}", env) for i in (1, 2)]
    _wait_for_running_trial_run(client, *workers[0])
    pg.stop()
    time.sleep(outage)
    pg.start()
    for proc, log in workers:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    logs = "".join(log.read_text() for _, log in workers)
    assert "the Optuna storage is unreachable" in logs and "the Optuna storage is back" \
        in logs, "the outage hit the workers"
    assert "no heartbeat" not in logs and "Traceback" not in logs

    studies = {k: optuna.load_study(study_name=f"{study}.{k}",
                                    storage=pg.url("optuna", password=True))
               for k in BUDGETS}
    assert {k: len(_counted(s)) for k, s in studies.items()} == BUDGETS
    assert all(t.state == TrialState.COMPLETE for s in studies.values() for t in s.trials), \
        "no trial failed (as stale, or dropped)"
    runs = _all_runs(client, EXPERIMENT)
    [parent] = [r for r in runs if r.data.tags.get("mlplab.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and "final_test_acc" in parent.data.metrics
    assert sorted(r.info.status for r in children) == ["FINISHED"] * sum(BUDGETS.values())

"""MLflow at the edge: where runs go, and logging that stays off the hot path.

Metrics are buffered and written with `log_batch` at most every FLUSH_SECONDS, so
tracking costs a small, measured share of a run (`Run.seconds`). Writes to SQLite are
retried when another process holds the database, so parallel trials don't fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlruns"
FLUSH_SECONDS = 10.0  # most often metrics reach the store during a run
RETRIES = 8  # attempts for a write that meets a locked database
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value

T = TypeVar("T")

# MLflow draws a bar for every artifact it reads back (e.g. validating the model's
# input example); noise in a training log. A user's own setting wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def prewarm() -> threading.Thread:
    """Import MLflow's store and model modules and matplotlib on a background thread.

    That start-up (~2 s, once per process) then overlaps with loading the data, whose
    NumPy work leaves the interpreter free; measured on an idle 2-core machine it cut
    a reports run's tracking from 1.3-1.6 s to 0.3-0.4 s, and the process's wall time
    by 2 s. The caller joins before opening the run and counts any wait as tracking.
    An import that fails here is left for the caller to meet and report.
    """

    def imports():
        with contextlib.suppress(Exception):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
            from mlflow.utils import requirements_utils

            import mlplab.plots  # noqa: F401
            import mlplab.pyfunc_model  # noqa: F401

            # The map of installed distributions that MLflow scans when it first logs
            # a model (~0.5 s). Private: if it moves, the scan simply stays in the run.
            requirements_utils._init_packages_to_modules_map()

    thread = threading.Thread(target=imports, name="mlplab-prewarm", daemon=True)
    thread.start()
    return thread


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: given, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in
    the folder the user ran from (absolute, so Hydra's output folders don't matter)."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a local SQLite store, `mlruns/<experiment>/` beside the database; a server
    decides its own."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "default"
    return (Path(uri[len(prefix):]).resolve().parent / ARTIFACTS_DIR / folder).as_uri()


def with_retries(fn: Callable[[], T], what: str = "MLflow write") -> T:
    """Call fn, retrying with back-off while SQLite reports the database busy or the
    schema is being created by another process."""
    delay = 0.2
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as err:  # MLflow wraps SQLAlchemy errors in its own types
            text = str(err).lower()
            transient = any(s in text for s in ("database is locked", "already exists",
                                                "busy", "unique constraint"))
            if not transient or attempt == RETRIES - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """Experiment id by name, creating it (artifacts under mlruns/) if needed; safe when
    several processes race to create it."""

    def attempt():
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))

    return with_retries(attempt, f"create experiment {name!r}")


def flatten(d, prefix="") -> dict[str, str]:
    """Nested config -> {'model.layers': '[50, 50]', ...}, values as MLflow params."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def git_commit(path: Path) -> str | None:
    """The commit of the checkout holding `path` (with '-dirty' if modified), if any."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        sha = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Run:
    """One MLflow run: buffered metrics, artifacts, final status.

    `seconds` adds up the wall time spent in tracking calls, so the overhead can be
    reported (and checked) against the run's total.
    """

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.seconds = 0.0
        self._pending = []
        self._last_flush = time.monotonic()

    @contextmanager
    def timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def log_metrics(self, metrics: dict[str, float], step: int, force: bool = False):
        from mlflow.entities import Metric

        with self.timed():
            now = int(time.time() * 1000)
            self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
            if force or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
                self.flush()

    def flush(self):
        with self.timed():
            # log_batch takes at most 1000 metrics per call
            while self._pending:
                chunk, self._pending = self._pending[:1000], self._pending[1000:]
                with_retries(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))
            self._last_flush = time.monotonic()

    def log_params(self, params: dict[str, str]):
        from mlflow.entities import Param

        with self.timed():
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # log_batch takes 100 params per call
                with_retries(lambda c=items[i:i + 100]:
                             self.client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: dict[str, str]):
        from mlflow.entities import RunTag

        with self.timed():
            items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
            with_retries(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_datasets(self, ds) -> None:
        """The train/val/test splits of an mlplab.data.Dataset as MLflow dataset
        inputs, in one write; the fingerprint is the digest, so nothing is re-hashed."""
        import mlflow
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        with self.timed():
            # An explicit source: MLflow's guess for a local path is ambiguous and warns.
            if ds.source.startswith(("http://", "https://")):
                source = HTTPDatasetSource(ds.source)
            else:
                source = CodeDatasetSource(tags={"uri": ds.source})
            fingerprint = ds.fingerprint()
            splits = (("train", "training"), ("val", "validation"), ("test", "test"))
            datasets = [mlflow.data.from_numpy(
                getattr(ds, f"X_{split}"), targets=getattr(ds, f"y_{split}"), source=source,
                name=f"{ds.name}-{split}", digest=f"{fingerprint}-{split}")
                for split, _ in splits]
            with_retries(lambda: mlflow.log_inputs(datasets=datasets,
                                                   contexts=[c for _, c in splits],
                                                   tags_list=[None] * len(splits)))

    def log_artifact(self, path: Path, folder: str | None = None):
        with self.timed():
            self.client.log_artifact(self.run_id, str(path), folder)


@contextmanager
def start_run(*, uri: str | None, experiment: str, run_name: str | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None):
    """Open a run; it ends FINISHED, KILLED on Ctrl-C, FAILED on any other exception.

    The run is also made the active fluent run, because MLflow's model and dataset
    logging functions attach to it.
    """
    import mlflow
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = with_retries(lambda: MlflowClient(uri), "open the tracking store")
    exp_id = get_or_create_experiment(client, experiment, uri)
    active = with_retries(lambda: mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id))
    run = Run(client, active.info.run_id)
    run.seconds = time.perf_counter() - t0  # opening the store is tracking cost too
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            run.flush()  # whatever was measured before a failure is kept
        finally:
            with_retries(lambda: mlflow.end_run(status=status))

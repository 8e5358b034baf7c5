"""MLflow at the edge: where runs go, and how a run is written.

Metrics are buffered and written with `log_batch` at most every FLUSH_SECONDS. Writes
to SQLite are retried when another process holds the database, so parallel trials
don't fail. Training runs call this from the tracking writer process
(`mlplab.writer`); the sweeper, the gradient check and the report call it directly.
"""

from __future__ import annotations

import os
import re
import subprocess
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


class Timed:
    """`seconds` adds up the wall time spent in `timed()` blocks: what tracking cost
    the caller, reported against the run's total."""

    seconds: float = 0.0

    @contextmanager
    def timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


class Run(Timed):
    """One MLflow run: buffered metrics, artifacts, final status."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._pending = []
        self._last_flush = time.monotonic()

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

    def log_datasets(self, spec: dict) -> None:
        """The splits described by `dataset_spec` as MLflow dataset inputs, in one
        write; the fingerprint is the digest, so nothing is re-hashed."""
        import mlflow
        import numpy as np
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        with self.timed():
            # An explicit source: MLflow's guess for a local path is ambiguous and warns.
            if spec["source"].startswith(("http://", "https://")):
                source = HTTPDatasetSource(spec["source"])
            else:
                source = CodeDatasetSource(tags={"uri": spec["source"]})
            # MLflow reads only shapes and dtypes when the digest is given, so
            # zero-stride stand-ins describe the splits without their data.
            like = lambda shape, dtype: np.broadcast_to(np.zeros((), dtype), shape)  # noqa: E731
            datasets = [mlflow.data.from_numpy(
                like(*split["features"]), targets=like(*split["targets"]), source=source,
                name=f"{spec['name']}-{name}", digest=f"{spec['fingerprint']}-{name}")
                for name, split in spec["splits"].items()]
            contexts = [spec["splits"][name]["context"] for name in spec["splits"]]
            with_retries(lambda: mlflow.log_inputs(datasets=datasets, contexts=contexts,
                                                   tags_list=[None] * len(datasets)))

    def log_artifact(self, path: Path, folder: str | None = None):
        with self.timed():
            self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        """Write what is buffered and close the run with `status` (and, if it is
        MLflow's active run, clear that, so the next run can start)."""
        import mlflow

        try:
            self.flush()  # whatever was measured before a failure is kept
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                with_retries(lambda: mlflow.end_run(status=status))
            else:
                with_retries(lambda: self.client.set_terminated(self.run_id, status))


def open_run(*, uri: str | None, experiment: str, run_name: str | None = None,
             tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> Run:
    """Start a run (tagged with the code's git commit) and make it MLflow's active
    run, because MLflow's model and dataset logging functions attach to that."""
    import mlflow
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = with_retries(lambda: MlflowClient(uri), "open the tracking store")
    exp_id = get_or_create_experiment(client, experiment, uri)
    tags = {"git_commit": git_commit(Path(__file__).parent), **(tags or {})}
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    active = with_retries(lambda: mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id))
    run = Run(client, active.info.run_id)
    run.seconds = time.perf_counter() - t0  # opening the store is tracking cost too
    return run


@contextmanager
def start_run(*, uri: str | None, experiment: str, run_name: str | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None):
    """A run that ends FINISHED, KILLED on Ctrl-C, FAILED on any other exception."""
    run = open_run(uri=uri, experiment=experiment, run_name=run_name, tags=tags,
                   parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.end(status)


def dataset_spec(ds) -> dict:
    """What `Run.log_datasets` needs of an mlplab.data.Dataset: names, source,
    fingerprint and each split's shapes and dtypes (not its data, which stays here)."""
    contexts = {"train": "training", "val": "validation", "test": "test"}
    splits = {}
    for name, context in contexts.items():
        X, y = getattr(ds, f"X_{name}"), getattr(ds, f"y_{name}")
        splits[name] = {"features": (X.shape, X.dtype.str), "targets": (y.shape, y.dtype.str),
                        "context": context}
    return {"name": ds.name, "source": ds.source, "fingerprint": ds.fingerprint,
            "splits": splits}

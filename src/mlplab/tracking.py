"""MLflow at the edge: where runs go, the store opened safely, and one run's record.

`run(...)` is the one way a command records a run: a context manager that opens it
and closes it with the outcome, FINISHED, FAILED (tag `failure` says why) or KILLED
(Ctrl-C). Metrics are sent with MLflow's own asynchronous logging, so
training never waits for the store; they are flushed when the run ends. MLflow is imported
here, lazily: a run that tracks nothing never imports it.

A fresh SQLite store is created by the first process under a file lock beside the
database while the others wait: MLflow's table creation is not safe to run twice at
once, and a half-migrated database cannot be opened again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mlplab.passwords import mask_password, unmask

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlruns"
SQLITE = "sqlite:///"
ASYNC_BUFFER_SECONDS = "5"  # MLflow's async logging writes what came in this long at once
RETRIES = 8  # attempts for a write that meets a locked database
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
MAX_TAG_LENGTH = 5000
# The UI opens a model-training experiment on its runs, not on the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

T = TypeVar("T")

# MLflow draws a bar for every artifact it reads back (e.g. validating the model's
# input example); noise in a training log. A user's own settings win.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Buffered, MLflow's async writer merges metrics into few writes, and closing a run
# wakes it at once (unbuffered, it polls its queue and a run's end waits up to 1 s).
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", ASYNC_BUFFER_SECONDS)


class TrackingError(RuntimeError):
    """A run could not be recorded: the store cannot be opened or refused a write."""


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: given (a masked password filled back in, see passwords.py),
    else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the folder the user ran from
    (absolute, so Hydra's output folders don't matter)."""
    if uri:
        return unmask(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"{SQLITE}{Path.cwd() / DEFAULT_DB}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a local SQLite store, `mlruns/<experiment>/` beside the database; a server
    decides its own."""
    if not uri.startswith(SQLITE):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "default"
    return (Path(uri[len(SQLITE):]).resolve().parent / ARTIFACTS_DIR / folder).as_uri()


def with_retries(fn: Callable[[], T]) -> T:
    """Call fn, retrying with back-off while SQLite reports the database busy or
    another process created the same row first."""
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


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold `<database>.lock` for a local SQLite store (no-op for other stores)."""
    if not uri.startswith(SQLITE):
        yield
        return
    import fcntl

    path = Path(uri[len(SQLITE):]).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=8)
def _client(uri: str):
    """One MlflowClient per store and process: a sweep's next trial reuses it (making
    one costs ~50 ms)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


@functools.lru_cache(maxsize=8)
def open_experiment(uri: str, name: str):
    """(MlflowClient, experiment id), creating the store and the experiment if needed:
    under the store's lock, so processes started together never race to create them.
    Once per process (a sweep's trials would wait on the lock and the lookup, ~0.1 s
    each); `run` looks again if the store or the experiment was replaced since."""

    def get_or_create():  # a worker on another machine may create it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                     tags=dict([EXPERIMENT_KIND]))
            exp = client.get_experiment_by_name(name)
        return exp

    try:
        with store_lock(uri):
            client = _client(uri)
            exp = with_retries(get_or_create)  # the first call opens (and creates) the store
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older mlplab
                with_retries(lambda: client.set_experiment_tag(exp_id, *EXPERIMENT_KIND))
    except Exception as err:
        raise TrackingError(f"cannot open the MLflow store {mask_password(uri)}: "
                            f"{mask_password(str(err).splitlines()[0])}") from err
    return client, exp_id


def runs_page(uri: str, experiment_id: str) -> str:
    """Where the UI lists an experiment's runs: on the server itself, or for a local
    store on `mlflow ui`'s default address. MLflow 3's UI opens experiments on its
    GenAI pages unless told the workflow, which the link does."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def flatten(d, prefix="") -> dict[str, str]:
    """Nested config -> {'model.layers': '[50, 50]', ...}, values as MLflow params."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = mask_password(str(value))[:MAX_PARAM_LENGTH]
    return out


@functools.lru_cache(maxsize=8)
def git_commit(path: Path) -> str | None:
    """The commit of the checkout holding `path` (with '-dirty' if modified), if any;
    asked once per process, whose code is what was imported."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        sha = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_tags() -> dict[str, str]:
    """The command the user ran (train.py, mlplab-train, ...) as the run's Source."""
    tags = {"mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.source.type": "LOCAL", "git_commit": git_commit(Path(__file__).parent)}
    return {k: v for k, v in tags.items() if v is not None}


def failure_of(err: BaseException) -> str:
    """The `failure` tag of a run ended by `err`."""
    return f"{type(err).__name__}: {err}"[:MAX_TAG_LENGTH]


class Run:
    """One open MLflow run. `seconds` adds up the wall time its calls cost the caller
    (store opening and MLflow's import included), reported against the run's total."""

    def __init__(self, client, run_id: str, experiment_id: str, seconds: float = 0.0):
        self.client, self.run_id, self.seconds = client, run_id, seconds
        self.experiment_id = experiment_id
        self._sent = []  # (metrics, MLflow's handle on their background write)

    @contextlib.contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except TrackingError:
            raise
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else repr(err)
            raise TrackingError(f"{what} for run {self.run_id}: {mask_password(first)}") \
                from err
        finally:
            self.seconds += time.perf_counter() - t0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue for MLflow's background writer, which merges what arrives within
        ASYNC_BUFFER_SECONDS into one write."""
        from mlflow.entities import Metric

        with self._timed("logging metrics"):
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self._sent.append((items, self.client.log_batch(self.run_id, metrics=items,
                                                            synchronous=False)))

    def flush(self) -> None:
        """Block until MLflow has written every metric queued so far."""
        import mlflow

        with self._timed("writing metrics"):
            mlflow.flush_async_logging()  # wakes the writer instead of waiting its buffer
            sent, self._sent = self._sent, []
            for items, operation in sent:
                try:
                    operation.wait()
                except Exception:  # e.g. a locked database: once more, in the open
                    with_retries(lambda i=items: self.client.log_batch(self.run_id,
                                                                        metrics=i))

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        with self._timed("logging params"):
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # log_batch takes 100 params per call
                with_retries(lambda c=items[i:i + 100]:
                             self.client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: dict[str, str | None]) -> None:
        from mlflow.entities import RunTag

        with self._timed("setting tags"):
            items = [RunTag(k, mask_password(str(v))[:MAX_TAG_LENGTH])
                     for k, v in tags.items() if v is not None]
            with_retries(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_datasets(self, ds) -> None:
        """The train/val/test splits of an mlplab.data.Dataset as MLflow dataset
        inputs, in one write; the data fingerprint is the digest, so nothing is
        hashed again."""
        import mlflow
        import numpy as np
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        with self._timed("logging datasets"):
            # An explicit source: MLflow's guess for a local path is ambiguous and warns.
            if ds.source.startswith(("http://", "https://")):
                source = HTTPDatasetSource(ds.source)
            else:
                source = CodeDatasetSource(tags={"uri": ds.source})
            # MLflow reads only shapes and dtypes when the digest is given.
            like = lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape)  # noqa: E731
            splits = {"train": "training", "val": "validation", "test": "test"}
            datasets = [mlflow.data.from_numpy(
                like(getattr(ds, f"X_{split}")), targets=like(getattr(ds, f"y_{split}")),
                source=source, name=f"{ds.name}-{split}",
                digest=f"{ds.fingerprint}-{split}") for split in splits]
            with_retries(lambda: mlflow.log_inputs(datasets=datasets,
                                                   contexts=list(splits.values()),
                                                   tags_list=[None] * len(datasets)))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        with self._timed(f"logging {Path(path).name}"):
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_model(self, log: Callable[[], object]) -> None:
        """Call `log()`, which logs a model to this run (MLflow's active run)."""
        with self._timed("logging the model"):
            log()

    def end(self, status: str, failure: str | None = None) -> None:
        """Write what is buffered and close the run with `status`."""
        import mlflow

        with self._timed(f"closing the run {status}"):
            try:
                if failure:
                    self.set_tags({"failure": failure})
                self.flush()  # whatever was measured before a failure is kept
            finally:
                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id:
                    with_retries(lambda: mlflow.end_run(status=status))
                else:
                    with_retries(lambda: self.client.set_terminated(self.run_id, status))


@contextlib.contextmanager
def run(*, uri: str, experiment: str, run_name: str | None = None,
        tags: dict[str, str | None] | None = None,
        parent_run_id: str | None = None) -> Iterator[Run]:
    """A run, MLflow's active one (its model and dataset logging attach to that), that
    ends FINISHED, KILLED on Ctrl-C, or FAILED with a `failure` tag on any other
    exception (raised on). TrackingError if the store cannot be used; a store that
    fails while closing after an error is only reported: the first error is raised."""
    t0 = time.perf_counter()
    client, exp_id = open_experiment(uri, experiment)
    import mlflow

    mlflow.set_tracking_uri(uri)
    tags = source_tags() | {k: str(v) for k, v in (tags or {}).items() if v is not None}

    def start():
        return with_retries(lambda: mlflow.start_run(
            experiment_id=exp_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id))

    try:
        try:
            active = start()
        except Exception:  # the store or the experiment may be new since: look again
            open_experiment.cache_clear()
            client, exp_id = open_experiment(uri, experiment)
            active = start()
    except Exception as err:
        raise TrackingError(f"cannot start a run in {mask_password(uri)}: "
                            f"{mask_password(str(err).splitlines()[0])}") from err
    opened = Run(client, active.info.run_id, exp_id, time.perf_counter() - t0)
    try:
        yield opened
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            opened.end(status, None if status == "KILLED" else failure_of(err))
        except TrackingError as end_err:
            print(f"mlplab: run {opened.run_id} could not be closed {status}: {end_err}",
                  file=sys.stderr)
        raise
    opened.end("FINISHED")

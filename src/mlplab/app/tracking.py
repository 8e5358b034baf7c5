"""MLflow at the edge: where runs go, the store opened safely, and one run's record.

`run(...)` is the one way a command records a run: a context manager that opens it
and closes it with the outcome, FINISHED, FAILED (tag `failure` says why) or KILLED
(Ctrl-C). The record goes to a spool on local disk first and reaches the store in the
background (spool.py), so training never waits for the store, nor loses its record
while the store is away. MLflow is imported here, lazily: a run that tracks nothing
never imports it.

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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mlplab.app.passwords import mask_password, unmask

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlruns"
SQLITE = "sqlite:///"
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
# MLflow's HTTP client retries a request 7 times over about two minutes. Every write
# goes through courier.py's thread, which retries for as long as it takes: a quick
# failure lets it say the store is away and a sweep's trial go on. A user's own wins.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


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
    from filelock import FileLock  # flock on POSIX, its own lock on Windows

    path = Path(uri[len(SQLITE):]).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One MlflowClient per store and process: a sweep's next trial reuses it (making
    one costs ~50 ms)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


@functools.lru_cache(maxsize=8)
def open_experiment(uri: str, name: str):
    """(MlflowClient, experiment id), creating the store and the experiment if needed:
    under the store's lock, so processes started together never race to create them.
    Once per process (a sweep's trials would wait on the lock and the lookup, ~0.1 s
    each); a failure is not kept, so the courier's next attempt opens it again."""

    def get_or_create():  # a worker on another machine may create it meanwhile
        exp = client_.get_experiment_by_name(name)
        if exp is None:
            client_.create_experiment(name, artifact_location=artifact_location(uri, name),
                                      tags=dict([EXPERIMENT_KIND]))
            exp = client_.get_experiment_by_name(name)
        return exp

    try:
        with store_lock(uri):
            client_ = client(uri)
            exp = with_retries(get_or_create)  # the first call opens (and creates) the store
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older mlplab
                with_retries(lambda: client_.set_experiment_tag(exp_id, *EXPERIMENT_KIND))
    except Exception as err:
        raise TrackingError(f"cannot open the MLflow store {mask_password(uri)}: "
                            f"{mask_password(str(err).splitlines()[0])}") from err
    return client_, exp_id


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
            out[name] = str(value)
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
    """One run's record, written to its spool (see spool.py) and delivered to the store
    in the background. `seconds` adds up the wall time its calls cost the caller;
    `run_id` is known once the store has the run, `pending` counts the operations it
    still lacked when the run ended."""

    def __init__(self, spool, seconds: float = 0.0):
        self.spool, self.seconds = spool, seconds
        self.pending = 0

    @property
    def run_id(self) -> str | None:
        return self.spool.run_id

    @property
    def experiment_id(self) -> str | None:
        return self.spool.experiment_id

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with self._timed():
            self.spool.metrics(metrics, step)

    def log_params(self, params: dict[str, str]) -> None:
        with self._timed():
            self.spool.params(params)

    def set_tags(self, tags: dict[str, str | None]) -> None:
        with self._timed():
            self.spool.tags(tags)

    def log_datasets(self, ds) -> None:
        """The train/val/test splits of an mlplab.engine.data.Dataset as MLflow dataset
        inputs; the data fingerprint is the digest, so nothing is hashed again."""
        import mlflow
        import numpy as np
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        with self._timed():
            # An explicit source: MLflow's guess for a local path is ambiguous and warns.
            if ds.source.startswith(("http://", "https://")):
                source = HTTPDatasetSource(ds.source)
            else:
                source = CodeDatasetSource(tags={"uri": ds.source})
            # MLflow reads only shapes and dtypes when the digest is given.
            like = lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape)  # noqa: E731
            contexts = {"train": "training", "val": "validation", "test": "test"}
            inputs = []
            for split, context in contexts.items():
                entity = mlflow.data.from_numpy(
                    like(getattr(ds, f"X_{split}")), targets=like(getattr(ds, f"y_{split}")),
                    source=source, name=f"{ds.name}-{split}",
                    digest=f"{ds.fingerprint}-{split}")._to_mlflow_entity()
                inputs.append({"dataset": {k: getattr(entity, k) for k in (
                    "name", "digest", "source_type", "source", "schema", "profile")},
                    "tags": {"mlflow.data.context": context}})
            self.spool.datasets(inputs)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        with self._timed():
            self.spool.artifact(path, folder)

    def log_model(self, weights: Path, examples: Path) -> None:
        """The network saved at `weights` and its input example (.npy), as a pyfunc
        model (pyfunc_model.log_model)."""
        with self._timed():
            self.spool.model(weights, examples)

    def end(self, status: str, failure: str | None = None) -> None:
        with self._timed():
            if failure:
                self.set_tags({"failure": failure})
            self.spool.end(status)


def check_store(uri: str, experiment: str) -> None:
    """A clear error before anything runs for a URI MLflow cannot use. A local store is
    opened (it cannot be away); a remote one is only named: it may be away for now."""
    try:
        if uri.startswith(SQLITE):
            open_experiment(uri, experiment)
        else:
            client(uri)
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(f"cannot use the MLflow store {mask_password(uri)}: "
                            f"{mask_password(str(err).strip().splitlines()[0])}") from err


@contextlib.contextmanager
def run(*, uri: str, experiment: str, spool_root: Path, run_name: str | None = None,
        tags: dict[str, str | None] | None = None, parent_run_id: str | None = None,
        parent_spool_id: str | None = None, spool_id: str | None = None,
        wait_seconds: float = 0.0, while_reachable: bool = False) -> Iterator[Run]:
    """A run that ends FINISHED, KILLED on Ctrl-C, or FAILED with a `failure` tag on any
    other exception (raised on). Its record is kept in a spool under `spool_root` and
    delivered in the background; at its end it waits up to `wait_seconds` for the
    store to have all of it (`while_reachable`: not while the store is away), and
    `Run.pending` says what is still waiting. TrackingError if the URI is unusable."""
    from mlplab.app import courier, spool

    t0 = time.perf_counter()
    check_store(uri, experiment)
    tags = source_tags() | (tags or {})
    kept = spool.Spool(Path(spool_root) / spool.SPOOL_DIR, spool_id or f"run-{uuid.uuid4().hex}",
                       uri, experiment, run_name=run_name, tags=tags,
                       parent_run_id=parent_run_id, parent_spool_id=parent_spool_id)
    courier.courier().add(kept)
    opened = Run(kept, time.perf_counter() - t0)
    try:
        yield opened
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        opened.end(status, None if status == "KILLED" else failure_of(err))
        opened.pending = courier.courier().wait([kept], wait_seconds, while_reachable)
        raise
    opened.end("FINISHED")
    t1 = time.perf_counter()
    opened.pending = courier.courier().wait([kept], wait_seconds, while_reachable)
    opened.seconds += time.perf_counter() - t1

"""The MLflow store: where runs go, opened safely, calls retried. A fresh SQLite store is
created by the first process under a file lock beside the database while the others
wait: MLflow's table creation is not safe to run twice at once, and a half-migrated
database cannot be opened again. MLflow is imported lazily."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
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

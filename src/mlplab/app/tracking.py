"""One run's record: `run(...)` is the one way a command records a run, a context
manager that opens it and closes it with the outcome, FINISHED, FAILED (tag `failure`
says why) or KILLED (Ctrl-C). The record goes to a spool on local disk first and
reaches the store in the background (spool.py, courier.py), so training never waits
for the store, nor loses its record while the store is away."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from mlplab.app import courier, spool
from mlplab.app.store import MAX_TAG_LENGTH, check_store


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

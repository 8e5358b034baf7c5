"""Every run's record kept on local disk until the MLflow store has it.

A run appends its record (the run itself, params, tags, metrics with their steps and
times, dataset inputs, artifacts, the model, its end) as operations to `ops.jsonl` in
its spool folder, `<output folder>/mlflow-spool/<spool id>-<random>/`, with copies of
its files beside: training never waits on the store, and memory stays bounded whatever
the outage. A courier thread (courier.py) delivers the operations in order as they
come; while the store is away it keeps trying.

Delivery is exactly once. `delivered.json` says how far it got, written after every
step, so a delivery killed half way resumes at the step it was in, and each step can
be taken twice without a duplicate: the run is looked up by its tag mlplab.spool_id
before one is created, params already there are skipped, tags and artifacts are
overwritten, MLflow's SQL stores keep one copy of a metric with the same key, step,
time and value, and a model is looked up by its run before one is logged. A spool is
removed once its whole record, end included, is in the store. A spool a process left
behind (the store away when it ended) is delivered by `mlplab-sync FOLDER`
(courier.sync).

A run can name its parent by the parent's spool id (a sweep's parent run, which may
not be in the store yet): its delivery waits until the parent's is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock

from mlplab.app import store
from mlplab.app.passwords import mask_password

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow-spool"  # in a run's output folder (a sweep's: in the sweep's)
OPS, DELIVERED, FILES, LOCK = "ops.jsonl", "delivered.json", "files", "lock"
SPOOL_TAG = "mlplab.spool_id"
MAX_METRICS, MAX_ITEMS = 1000, 100  # MLflow's log_batch limits


class NotYet(Exception):
    """A run that cannot be delivered before another (its parent) is."""


def now_ms() -> int:
    return int(time.time() * 1000)


class Spool:
    """One run's record on disk, as it is written. The writing process holds the
    folder's lock until the record is delivered, so `mlplab-sync` leaves it alone."""

    def __init__(self, root: Path, spool_id: str, uri: str, experiment: str, *,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, parent_spool_id: str | None = None,
                 create: bool = True):
        self.spool_id, self.uri = spool_id, uri  # the real URI: in memory only
        self.folder = Path(root).resolve() / f"{spool_id}-{uuid.uuid4().hex[:8]}"
        (self.folder / FILES).mkdir(parents=True)
        self._lock = FileLock(self.folder / LOCK, thread_local=False)
        self._lock.acquire()
        # open for the run's whole life (closed by `end`): one append per operation
        self._ops = open(self.folder / OPS, "a", encoding="utf-8")  # noqa: SIM115
        self._files = 0
        self.ended = False
        self.done = False  # the whole record is in the store (set by the courier)
        self.rejected = False  # ... or the store refused it: it was set aside
        self.run_id: str | None = None  # once the run is in the store
        self.experiment_id: str | None = None
        self.on_write = lambda closing: None  # the courier's wake-up (courier.add)
        self.append({"op": "run", "spool_id": spool_id, "uri": mask_password(uri),
                     "experiment": experiment, "run_name": _masked(run_name),
                     "tags": _texts(tags or {}, store.MAX_TAG_LENGTH),
                     "start_time": now_ms(), "parent_run_id": parent_run_id,
                     "parent_spool_id": parent_spool_id, "create": create})

    def append(self, op: dict) -> None:
        if self.ended:
            raise ValueError(f"spool {self.folder} is closed: the run has ended")
        self._ops.write(json.dumps(op) + "\n")
        self._ops.flush()  # one write of a whole line: a reader never sees half of one
        self.on_write(op["op"] in ("end", "detach"))

    def params(self, params: dict) -> None:
        self.append({"op": "params", "params": _texts(params, store.MAX_PARAM_LENGTH)})

    def tags(self, tags: dict) -> None:
        """Tags; a None value is left out."""
        self.append({"op": "tags", "tags": _texts(tags, store.MAX_TAG_LENGTH)})

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        t = now_ms()
        self.append({"op": "metrics",
                     "metrics": [[k, float(v), t, step] for k, v in metrics.items()]})

    def datasets(self, inputs: list[dict]) -> None:
        """[{'dataset': {name, digest, source_type, source, schema, profile}, 'tags': {}}]"""
        self.append({"op": "datasets", "inputs": _masked(inputs)})

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.append({"op": "artifact", "file": self._keep(path), "folder": folder})

    def model(self, weights: Path, examples: Path) -> None:
        """The network saved by `network.save` and its input example (.npy), logged as
        a pyfunc model when delivered (see pyfunc_model.log_model)."""
        self.append({"op": "model", "weights": self._keep(weights),
                     "examples": self._keep(examples)})

    def status(self, status: str) -> None:
        self.append({"op": "status", "status": status, "time": now_ms()})

    def end(self, status: str) -> None:
        self._close({"op": "end", "status": status, "end_time": now_ms()})

    def detach(self) -> None:
        """Close this spool and leave the run's status to another process (a sweep's
        helper worker writing to the parent run another worker ends)."""
        self._close({"op": "detach"})

    def _close(self, op: dict) -> None:
        self.append(op)
        self.ended = True
        self._ops.close()

    def release(self) -> None:
        """Let another process (mlplab-sync) deliver what is left."""
        self._lock.release()

    def _keep(self, path: Path) -> str:
        self._files += 1
        name = f"{FILES}/{self._files}/{Path(path).name}"
        (self.folder / name).parent.mkdir()
        shutil.copyfile(path, self.folder / name)
        return name


def _masked(value):
    """Every string in `value` (nested lists and dicts) with its passwords masked."""
    if isinstance(value, str):
        return mask_password(value)
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return value


def _texts(values: dict, limit: int) -> dict[str, str]:
    """Values as MLflow keeps them: text within its length limit, passwords masked
    (the one place a run's record is masked: see passwords.py)."""
    return {k: mask_password(str(v))[:limit] for k, v in values.items() if v is not None}


# --- delivery ---------------------------------------------------------------------------

def _state(folder: Path) -> dict:
    try:
        return json.loads((folder / DELIVERED).read_text())
    except FileNotFoundError:
        return {"offset": 0, "run_id": None, "experiment_id": None, "ended": False}


def _save_state(folder: Path, state: dict) -> None:
    tmp = folder / f"{DELIVERED}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / DELIVERED)  # whole or not at all, even if killed


def _steps(folder: Path, offset: int):
    """(ops, offset after them): the complete lines from `offset`, consecutive metrics
    merged into one step of at most MAX_METRICS."""
    with open(folder / OPS, "rb") as f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # being written
            op = json.loads(raw)
            offset += len(raw)
            yield op, offset


def pending_ops(folder: Path) -> int:
    """Operations of a spool the store does not have yet (none once it is removed)."""
    try:
        return sum(1 for _ in _steps(folder, _state(folder)["offset"]))
    except FileNotFoundError:
        return 0


def deliver(folder: Path, uri: str | None = None) -> dict:
    """Deliver what the store lacks of the spool in `folder` (to `uri`, else to the
    store the run was written for); returns the delivery state (run_id, experiment_id,
    ended). A spool whose record is wholly delivered is removed. Raises NotYet, or
    whatever the store raised (its step is taken again next time)."""
    state = _state(folder)
    uri = _uri(folder, uri)
    client = store.client(uri)
    batch: list = []  # metrics waiting to be written together
    after_batch = state["offset"]
    for op, offset in _steps(folder, state["offset"]):
        if op["op"] == "run":
            _deliver_run(client, op, state, uri)
        else:
            if op["op"] == "metrics" and len(batch) + len(op["metrics"]) <= MAX_METRICS:
                batch += op["metrics"]
                after_batch = offset
                continue
            _write_metrics(client, state, batch, after_batch, folder)
            batch = []
            if op["op"] == "metrics":
                batch, after_batch = list(op["metrics"]), offset
                continue
            _apply(client, op, state, folder, uri)
        state["offset"] = offset
        _save_state(folder, state)
    if batch:
        _write_metrics(client, state, batch, after_batch, folder)
    if state["ended"]:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last spool of its folder: the folder too
            folder.parent.rmdir()
    return state


def _uri(folder: Path, uri: str | None) -> str:
    if uri:
        return uri
    with open(folder / OPS, encoding="utf-8") as f:
        return store.resolve_uri(json.loads(f.readline())["uri"])


def _deliver_run(client, op: dict, state: dict, uri: str) -> None:
    """The run: found by its spool id, else created with its start time and tags."""
    exp_id = store.open_experiment(uri, op["experiment"])[1]
    run_id = _find(client, exp_id, op["spool_id"])
    if run_id is not None and op["tags"]:  # made by another spool of it: its tags too
        _log_tags(client, run_id, op["tags"])
    if run_id is None:
        if not op["create"]:
            raise NotYet(f"run {op['spool_id']} is not in the store yet")
        parent = op["parent_run_id"]
        if op["parent_spool_id"]:
            parent = _find(client, exp_id, op["parent_spool_id"])
            if parent is None:
                raise NotYet(f"parent run {op['parent_spool_id']} is not in the store yet")
        tags = {**op["tags"], SPOOL_TAG: op["spool_id"]}
        if parent:
            tags["mlflow.parentRunId"] = parent
        store.with_retries(lambda: client.create_run(
            exp_id, start_time=op["start_time"], tags=tags, run_name=op["run_name"]))
        run_id = _one_run(client, exp_id, op["spool_id"])
    state["run_id"], state["experiment_id"] = run_id, exp_id


def _one_run(client, experiment_id: str, spool_id: str) -> str:
    """The run just made for `spool_id`: one only, though MLflow's HTTP client may
    have sent the create twice (a retry after a lost answer): the others are deleted."""
    from mlflow.entities import ViewType

    runs = sorted(_tagged(client, experiment_id, spool_id, ViewType.ACTIVE_ONLY))
    for extra in runs[1:]:
        store.with_retries(lambda r=extra: client.delete_run(r))
    return runs[0]


def _find(client, experiment_id: str, spool_id: str) -> str | None:
    from mlflow.entities import ViewType

    runs = _tagged(client, experiment_id, spool_id, ViewType.ALL, max_results=1)
    return runs[0] if runs else None


def _tagged(client, experiment_id: str, spool_id: str, view, **kwargs) -> list[str]:
    """The ids of the runs tagged with `spool_id`."""
    return [r.info.run_id for r in store.with_retries(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`{SPOOL_TAG}` = '{spool_id}'",
        run_view_type=view, **kwargs))]


def _write_metrics(client, state: dict, batch: list, offset: int, folder: Path) -> None:
    from mlflow.entities import Metric

    if batch:
        items = [Metric(k, v, t, s) for k, v, t, s in batch]
        for i in range(0, len(items), MAX_METRICS):
            store.with_retries(lambda c=items[i:i + MAX_METRICS]: client.log_batch(
                state["run_id"], metrics=c))
        state["offset"] = offset
        _save_state(folder, state)


def _apply(client, op: dict, state: dict, folder: Path, uri: str) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    run_id, kind = state["run_id"], op["op"]
    if kind == "params":
        have = store.with_retries(lambda: client.get_run(run_id)).data.params
        for key in [k for k, v in op["params"].items() if k in have and have[k] != v]:
            # params are write-once: a resumed sweep with a changed setting keeps the first
            log.warning("run %s keeps param %s=%s (not %s)", run_id, key, have[key],
                        op["params"][key])
        items = [Param(k, v) for k, v in op["params"].items() if k not in have]
        for i in range(0, len(items), MAX_ITEMS):
            store.with_retries(lambda c=items[i:i + MAX_ITEMS]:
                                  client.log_batch(run_id, params=c))
    elif kind == "tags":
        _log_tags(client, run_id, op["tags"])
    elif kind == "datasets":
        inputs = [DatasetInput(Dataset(**d["dataset"]),
                               [InputTag(k, v) for k, v in d["tags"].items()])
                  for d in op["inputs"]]
        store.with_retries(lambda: client.log_inputs(run_id, datasets=inputs))
    elif kind == "artifact":
        store.with_retries(lambda: client.log_artifact(run_id, str(folder / op["file"]),
                                                          op["folder"]))
    elif kind == "model":
        _deliver_model(client, state, folder / op["weights"], folder / op["examples"], uri)
    elif kind == "status":
        if not _ended_after(client, run_id, op.get("time", 0)):
            store.with_retries(lambda: client.update_run(run_id, status=op["status"]))
    elif kind == "end":
        # a spool delivered late (an interrupted run of a sweep resumed since) does not
        # overwrite a newer end
        if not _ended_after(client, run_id, op["end_time"]):
            store.with_retries(lambda: client.set_terminated(run_id, op["status"],
                                                                end_time=op["end_time"]))
        state["ended"] = True
    elif kind == "detach":
        state["ended"] = True
    else:
        raise ValueError(f"unknown spool operation {kind!r} in {folder}")


def _log_tags(client, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(items), MAX_ITEMS):
        store.with_retries(lambda c=items[i:i + MAX_ITEMS]: client.log_batch(run_id,
                                                                                tags=c))


def _ended_after(client, run_id: str, time_ms: int) -> bool:
    """Whether the run ended (in the store) after `time_ms`."""
    info = store.with_retries(lambda: client.get_run(run_id)).info
    return info.status != "RUNNING" and (info.end_time or 0) > time_ms


def _deliver_model(client, state: dict, weights: Path, examples: Path, uri: str) -> None:
    """The network as a pyfunc model of the run, unless the run has it already. A model
    left PENDING by a delivery cut off half way (its link to the run may be made
    already, and cannot be made twice) is deleted and logged afresh."""
    import mlflow
    import numpy as np
    from mlflow.entities import LoggedModelStatus

    from mlplab.app import pyfunc_model

    run_id, exp_id = state["run_id"], state["experiment_id"]
    logged = store.with_retries(lambda: client.search_logged_models(
        [exp_id], filter_string=f"source_run_id = '{run_id}' AND name = '{pyfunc_model.NAME}'"))
    if any(m.status == LoggedModelStatus.READY for m in logged):
        return
    for pending in logged:
        store.with_retries(lambda m=pending: client.delete_logged_model(m.model_id))
    model = store.with_retries(lambda: client.create_logged_model(
        exp_id, name=pyfunc_model.NAME, source_run_id=run_id,
        params=client.get_run(run_id).data.params))
    # MLflow writes a model's files through its fluent API, which uses the global URI
    mlflow.set_tracking_uri(uri)
    pyfunc_model.log_model(weights, np.load(examples), run_id=run_id, model_id=model.model_id)

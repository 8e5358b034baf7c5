"""The sweep in MLflow: one parent run, every trial a child run, a summary at the end.

The parent is written with `MlflowClient` only, never the fluent API: trials may run
in this same process (Hydra's basic launcher) and make their own run the active one.
Its id is kept as a user attribute of the sweep's Optuna study, so a second worker
or a re-run attaches to the same parent. Every write goes through `with_retries`
because workers share one SQLite store.

Contract with `mlplab.commands` (the report): the parent has tags mlplab.sweep=true
and mlplab.study, artifacts trials.csv (stage, number, state, value, one column per
parameter) and accuracy_vs_<param>_stage<i>.png, metrics final_test_acc and
best_<param>; the final retrain's child run has tag stage=final.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from mlplab import plots, tracking
from mlplab.passwords import mask_password

from ._space import Param

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_SECONDS = 30.0  # how long a worker waits for the creator to name the parent
FINAL = "final"
TEST_ACC = "test_acc"  # the app's metric on the final retrain, copied to the trial
MAX_TAG_LENGTH = tracking.MAX_TAG_LENGTH


@dataclass
class StageRecord:
    """What a stage left: its label (0, 1, ..., final), the space it searched and its
    counted, finished trials."""

    label: str
    params: list[Param]
    trials: list[FrozenTrial]

    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE]

    def top(self, k: int, maximize: bool) -> list[FrozenTrial]:
        return sorted(self.complete(), key=lambda t: t.value, reverse=maximize)[:k]


class ParentRun:
    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.client, self.experiment_id = tracking.open_experiment(uri, experiment)
        self.run_id: str | None = None

    def attach(self, sweep_study, created: bool, study_name: str, storage: str) -> str:
        """The sweep's parent run: made by the worker that created the study, found
        by the others (and by re-runs) through the study's user attribute."""
        run_id = sweep_study.user_attrs.get(PARENT_ATTR)
        deadline = time.monotonic() + (0 if created else PARENT_WAIT_SECONDS)
        while run_id is None and time.monotonic() < deadline:
            time.sleep(0.5)
            run_id = sweep_study.user_attrs.get(PARENT_ATTR)  # read from the storage
        if run_id is not None and not self._exists(run_id):
            log.warning("parent run %s of study %s is gone from %s; starting a new one",
                        run_id, study_name, mask_password(self.uri))
            run_id = None
        if run_id is None:
            tags = {"mlplab.sweep": "true", "mlplab.study": study_name,
                    "mlplab.storage": storage, **tracking.source_tags()}
            run = tracking.with_retries(lambda: self.client.create_run(
                self.experiment_id, run_name=study_name, tags=tags))
            run_id = run.info.run_id
            sweep_study.set_user_attr(PARENT_ATTR, run_id)
        self.run_id = run_id
        self.set_status("RUNNING")
        return run_id

    def _exists(self, run_id: str) -> bool:
        try:
            tracking.with_retries(lambda: self.client.get_run(run_id))
            return True
        except Exception:  # MLflow raises its own "not found"
            return False

    def set_status(self, status: str) -> None:
        if status == "RUNNING":
            tracking.with_retries(lambda: self.client.update_run(self.run_id, status=status))
        else:
            tracking.with_retries(lambda: self.client.set_terminated(self.run_id, status))

    def log_params(self, params: dict) -> None:
        """Params are write-once in MLflow: a re-run with a changed setting keeps the
        first value (and says so) instead of failing the sweep."""
        from mlflow.entities import Param as MlflowParam

        for key, value in params.items():
            item = [MlflowParam(key, str(value)[:tracking.MAX_PARAM_LENGTH])]
            try:
                tracking.with_retries(lambda i=item: self.client.log_batch(self.run_id,
                                                                            params=i))
            except Exception as err:
                log.warning("parent run param %s=%s not logged: %s", key, value,
                            str(err).splitlines()[0])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(v)]
        if items:
            tracking.with_retries(lambda: self.client.log_batch(self.run_id, metrics=items))

    # --- children -------------------------------------------------------------------

    def children(self, stage: str, number: int | None = None) -> list:
        query = f"tags.`mlflow.parentRunId` = '{self.run_id}' and tags.stage = '{stage}'"
        if number is not None:
            query += f" and tags.trial = '{number}'"
        return tracking.with_retries(lambda: self.client.search_runs(
            [self.experiment_id], filter_string=query, max_results=1000))

    def record_failure(self, stage: str, trial: FrozenTrial | object, params: dict,
                       failure: str) -> None:
        """Make a failed trial visible in MLflow: a FAILED child run, created here
        when the job failed before it could open its own (e.g. a bad config)."""
        runs = self.children(stage, trial.number)
        for run in runs:
            if run.info.status == "RUNNING":
                tracking.with_retries(lambda r=run: self.client.set_terminated(
                    r.info.run_id, "FAILED"))
        if runs:
            return
        tags = {"mlflow.parentRunId": self.run_id, "stage": stage,
                "trial": str(trial.number), "failure": failure[:MAX_TAG_LENGTH]}
        run = tracking.with_retries(lambda: self.client.create_run(
            self.experiment_id, run_name=run_name(stage, trial.number, params), tags=tags))
        self._child_params(run.info.run_id, params)
        tracking.with_retries(lambda: self.client.set_terminated(run.info.run_id, "FAILED"))

    def _child_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param as MlflowParam

        items = [MlflowParam(k, str(v)) for k, v in params.items()]
        if items:
            tracking.with_retries(lambda: self.client.log_batch(run_id, params=items))

    def mark_ended(self, stage: str, numbers: list[int], status: str = "KILLED",
                   failure: str | None = None) -> None:
        """Child runs of interrupted trials still shown RUNNING end with `status`
        (and a `failure` tag): their process is gone and cannot close them."""
        for number in numbers:
            for run in self.children(stage, number):
                if run.info.status == "RUNNING":
                    if failure:
                        tracking.with_retries(lambda r=run: self.client.set_tag(
                            r.info.run_id, "failure", failure))
                    tracking.with_retries(lambda r=run: self.client.set_terminated(
                        r.info.run_id, status))

    def test_accuracy(self, stage: str, number: int) -> float | None:
        """A finished trial's test accuracy, from its child run (complete in the store
        once the job has returned)."""
        for run in self.children(stage, number):
            if run.info.status == "FINISHED" and TEST_ACC in run.data.metrics:
                return run.data.metrics[TEST_ACC]
        return None

    # --- summary ----------------------------------------------------------------------

    def write_summary(self, records: list[StageRecord], top_k: int, maximize: bool) -> None:
        """trials.csv, a plot per stage and numeric parameter, best value and params
        per stage (metrics stepped by stage), and the final retrain's accuracies."""
        names = list(dict.fromkeys(p.name for r in records for p in r.params))
        searched = [r for r in records if r.label != FINAL]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            table = tmp / "trials.csv"
            write_table(records, names, table)
            self._artifact(table)
            for i, record in enumerate(searched):
                best = record.top(top_k, maximize)
                for p in record.params:
                    if p.numeric:
                        path = tmp / f"accuracy_vs_{p.name}_stage{record.label}.png"
                        _stage_plot(record, p, best, path)
                        self._artifact(path)
                if best:
                    top = best[0]
                    self.log_metrics({"best_value": top.value,
                                      **{f"best_{k}": v for k, v in top.params.items()
                                         if _is_number(v)}}, step=i)
                self.log_metrics({"n_complete": len(record.complete()),
                                  "n_failed": len(record.trials) - len(record.complete())},
                                 step=i)
        if searched and searched[-1].complete():
            top = searched[-1].top(1, maximize)[0]
            self.log_params({f"best_{k}": v for k, v in top.params.items()})
        final = [r for r in records if r.label == FINAL]
        if final and final[0].complete():
            trial = final[0].complete()[0]
            test_acc = trial.user_attrs.get(TEST_ACC)
            self.log_metrics({"final_val_acc": trial.value, "final_test_acc": test_acc})
            if test_acc is None:
                log.warning("final retrain (trial %d) has no test accuracy", trial.number)

    def _artifact(self, path: Path) -> None:
        tracking.with_retries(lambda: self.client.log_artifact(self.run_id, str(path)))


def run_name(stage: str, number: int, params: dict | None = None) -> str:
    """'stage0-trial3 lam=0.00123' (the final retrain: 'final lam=...'): the runs list
    says which trial it is and what it tried."""
    name = FINAL if stage == FINAL else f"stage{stage}-trial{number}"
    values = " ".join(f"{k}={v:.3g}" if _is_number(v) else f"{k}={v}"
                      for k, v in (params or {}).items())
    return f"{name} {values}" if values else name


def write_table(records: list[StageRecord], names: list[str], path: Path) -> None:
    """One row per counted trial: stage, number, state, value, then each parameter."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["stage", "number", "state", "value", *names])
        for record in records:
            for t in record.trials:
                value = "" if t.value is None else repr(t.value)
                out.writerow([record.label, t.number, t.state.name, value,
                              *(t.params.get(n, "") for n in names)])


def _stage_plot(record: StageRecord, p: Param, best: list[FrozenTrial], path: Path) -> None:
    done = [t for t in record.complete() if p.name in t.params]
    failed = [t.params[p.name] for t in record.trials
              if t.state == TrialState.FAIL and p.name in t.params]
    d = p.distribution
    plots.plot_search_stage(
        [(t.params[p.name], t.value) for t in done],
        [(t.params[p.name], t.value) for t in best if p.name in t.params],
        failed, path, param=p.name, span=(d.low, d.high), log_x=p.log,
        title=f"stage {record.label}: {p.name} in [{d.low:.3g}, {d.high:.3g}], "
              f"{len(record.trials)} trials")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


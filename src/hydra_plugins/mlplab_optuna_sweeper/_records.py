"""The sweep in MLflow: one parent run (written through a spool, as every run is, and
known by its spool id, kept on the sweep's study), every trial a child run, a summary.

What `mlplab.app.report` reads: tags mlplab.sweep=true, mlplab.study, best.<param>;
artifact trials.csv (stage, number, state, value, test_acc, pruned_at, a column per
parameter); metrics final_val_acc, final_test_acc (means over the chosen candidate's
seeds, with _sd); the final retrains' runs tagged stage=final (stage=choose: compared).
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from optuna.trial import FrozenTrial

from mlplab.app import courier, plots, spool, store, tracking
from mlplab.app.passwords import mask_password

from ._rules import (
    CHOOSE,
    FINAL,
    PRUNED_AT,
    TEST_ACC,
    Candidate,
    StageRecord,
    candidates,
    choose,
    first_value,
    front_pick,
    pareto_front,
)
from ._space import Param

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_spool_id"  # the parent run by its spool id
PARENT_WAIT_SECONDS = 30.0  # how long a worker waits for the creator to name the parent
TABLE_COLUMNS = ("stage", "number", "state", "value", TEST_ACC, PRUNED_AT)


class ParentRun:
    """The sweep's parent run, written through a spool (mlplab.app.spool) like every run:
    a sweep goes on while the MLflow store is away and the parent reaches the store
    when it returns. It is known by its spool id, kept as a user attribute of the
    sweep's Optuna study, so a second worker or a re-run attaches to the same parent;
    trials name it as their parent by that id too."""

    def __init__(self, uri: str, experiment: str, spool_root: Path):
        self.uri, self.experiment, self.spool_root = uri, experiment, spool_root
        self.spool: spool.Spool | None = None

    @property
    def spool_id(self) -> str:
        return self.spool.spool_id

    def attach(self, sweep_study, created: bool, study_name: str, storage: str,
               mark_running: bool = True) -> str:
        """Made by the worker that named it (the one that created the study), found
        by the others (and by re-runs) through the study's user attribute: only its
        namer creates the run, so two workers never both do while the store is away.
        A helper another worker started leaves the run's status to that one
        (`mark_running=False`)."""
        spool_id = sweep_study.user_attrs.get(PARENT_ATTR)
        deadline = time.monotonic() + (0 if created else PARENT_WAIT_SECONDS)
        while spool_id is None and time.monotonic() < deadline:
            time.sleep(0.5)
            spool_id = sweep_study.user_attrs.get(PARENT_ATTR)  # read from the storage
        named_here = spool_id is None
        if named_here:
            spool_id = f"sweep-{uuid.uuid4().hex}"
            sweep_study.set_user_attr(PARENT_ATTR, spool_id)
        tags = {"mlplab.sweep": "true", "mlplab.study": study_name,
                "mlplab.storage": storage, **tracking.source_tags()}
        self.spool = spool.Spool(self.spool_root / spool.SPOOL_DIR, spool_id, self.uri,
                                 self.experiment, run_name=study_name, tags=tags,
                                 create=named_here)
        courier.courier().add(self.spool)
        if mark_running:
            self.spool.status("RUNNING")
        return spool_id

    def child_spool_id(self, stage: str, number: int) -> str:
        """A trial's run by its place in the sweep: the job writes it, and the sweep
        finds the same run to mark it failed."""
        return f"{self.spool_id}.{stage}.{number}"

    def set_status(self, status: str) -> None:
        if status == "RUNNING":
            self.spool.status(status)
        else:
            self.spool.end(status)

    def detach(self) -> None:
        self.spool.detach()

    def log_params(self, params: dict) -> None:
        """Params are write-once in MLflow: a re-run with a changed setting keeps the
        first value (and says so) instead of failing the sweep."""
        self.spool.params(params)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        items = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if items:
            self.spool.metrics(items, step)

    # --- children -------------------------------------------------------------------

    def record_failure(self, stage: str, trial: FrozenTrial | object, params: dict,
                       failure: str) -> None:
        """Make a failed trial visible in MLflow: its child run FAILED with a `failure`
        tag, the job's own run if it opened one (the same spool id), else a new one.
        A job whose spool is still in the sweep's folder (another process may deliver
        it) opened its run: this record only adds to it, never creates it."""
        child_id = self.child_spool_id(stage, trial.number)
        opened = any(self.spool_root.glob(f"**/{spool.SPOOL_DIR}/{child_id}-*"))
        child = spool.Spool(
            self.spool_root / spool.SPOOL_DIR, child_id, self.uri, self.experiment,
            run_name=run_name(stage, trial.number, params),
            tags={"stage": stage, "trial": str(trial.number)},
            parent_spool_id=self.spool_id, create=not opened)
        courier.courier().add(child)
        child.params(params)
        child.tags({"failure": failure})
        child.end("FAILED")

    def mark_ended(self, stage: str, numbers: list[int], status: str = "KILLED",
                   failure: str | None = None) -> None:
        """Child runs of interrupted trials still shown RUNNING end with `status`
        (and a `failure` tag): their process is gone and cannot close them. Only
        while the store answers (it shows them RUNNING until then)."""
        try:
            # (this worker's courier may not have delivered the parent run yet)
            client, experiment_id = store.open_experiment(self.uri, self.experiment)
            for number in numbers:
                query = f"tags.`{spool.SPOOL_TAG}` = '{self.child_spool_id(stage, number)}'"
                for run in store.with_retries(lambda q=query: client.search_runs(
                        [experiment_id], filter_string=q)):
                    if run.info.status == "RUNNING":
                        if failure:
                            store.with_retries(lambda r=run: client.set_tag(
                                r.info.run_id, "failure", failure))
                        store.with_retries(lambda r=run: client.set_terminated(
                            r.info.run_id, status))
        except Exception as err:  # the store is away: the runs stay as they are shown
            log.warning("trials %s of stage %s: their runs not marked %s (%s)", numbers,
                        stage, status, mask_password(str(err).splitlines()[0]))

    # --- summary ----------------------------------------------------------------------

    def write_summary(self, records: list[StageRecord], top_k: int, directions: list[str],
                      objectives: tuple[str, ...] = ("val_acc",),
                      front_tolerance: float = 0.0) -> None:
        """trials.csv, a plot per stage and numeric parameter, best value and params
        per stage (metrics stepped by stage), and the final step's candidates; with
        several objectives, the last searched stage's Pareto front (pareto_front.csv,
        .png) and the member the front rule picks as the answer."""
        maximize = directions[0] == "maximize"
        names = list(dict.fromkeys(p.name for r in records for p in r.params))
        searched = [r for r in records if r.label not in (CHOOSE, FINAL)]
        picked = None
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            table = tmp / "trials.csv"
            write_table(records, names, table, objectives)
            self._artifact(table)
            if len(directions) > 1 and searched:
                front = pareto_front(searched[-1].trials, directions)
                picked = front_pick(front, directions, front_tolerance)
                self._write_front(searched[-1], front, picked, names, objectives, tmp)
            for i, record in enumerate(searched):
                best = record.top(top_k, maximize)
                for p in record.params:
                    if p.numeric:
                        path = tmp / f"accuracy_vs_{p.name}_stage{record.label}.png"
                        _stage_plot(record, p, best, path)
                        self._artifact(path)
                if best:
                    self.log_metrics({"best_value": first_value(best[0]),
                                      **_numbers("best_", best[0].params)}, step=i)
                self.log_metrics({"n_complete": len(record.complete()),
                                  "n_pruned": len(record.pruned()),
                                  "n_failed": len(record.failed())}, step=i)
        answer = searched[-1].top(1, maximize)[0].params \
            if searched and searched[-1].complete() else None
        if picked is not None:
            answer = picked.params
        final = next((r for r in records if r.label == FINAL), None)
        if final is not None:
            compared = next((r for r in records if r.label == CHOOSE), final)
            chosen = self._write_final(compared, final, maximize, objectives[0])
            if chosen is not None:
                answer = chosen.params
                self.log_metrics(_numbers("best_", answer), step=len(searched))
        if answer is not None:  # tags, not params: a resumed sweep may change its answer
            self.set_tags({f"best.{k}": v for k, v in answer.items()})

    def _write_front(self, record: StageRecord, front: list[FrozenTrial],
                     picked: FrozenTrial | None, names: list[str],
                     objectives: tuple[str, ...], tmp: Path) -> None:
        """The Pareto front as a table (one row per member, best first objective first)
        and a plot of the first two objectives; `front_size` and `front` tags."""
        table = tmp / "pareto_front.csv"
        with open(table, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["stage", "number", *objectives, "picked", *names])
            for t in front:
                out.writerow([record.label, t.number, *map(repr, t.values), t is picked,
                              *(t.params.get(n, "") for n in names)])
        self._artifact(table)
        path = tmp / "pareto_front.png"
        plots.plot_pareto([tuple(t.values[:2]) for t in record.complete()],
                          [tuple(t.values[:2]) for t in front], path,
                          labels=(objectives[0], objectives[1]),
                          chosen=tuple(picked.values[:2]) if picked else None,
                          title=f"stage {record.label}: {len(record.complete())} complete "
                                f"trials, {len(front)} on the front")
        self._artifact(path)
        self.set_tags({"front_size": len(front),
                       "front": " ".join(str(t.number) for t in front)})

    def _write_final(self, compared: StageRecord, final: StageRecord, maximize: bool,
                     objective: str = "val_acc") -> Candidate | None:
        """Each candidate's mean and spread of validation accuracy over its seeds in
        `compared` (metrics stepped by rank, a candidate<i> tag naming it) and the
        chosen one's validation and test accuracy in `final` (the same record, or the
        retrains of the winner of a `choose` record): final_val_acc, final_test_acc
        (means), _sd."""
        cands = candidates(compared)
        for i, c in enumerate(cands):
            self.set_tags({f"candidate{i}": " ".join(f"{k}={v}" for k, v in c.params.items())})
            if c.val:
                self.log_metrics({f"candidate_{objective}": statistics.fmean(c.val),
                                  f"candidate_{objective}_sd": Candidate.spread(c.val),
                                  "candidate_seeds": len(c.val)}, step=i)
        chosen = choose(cands, maximize)
        if compared is not final:
            params = final.candidates[0]  # the winner the final step retrained
            log.info("final: chose %s in the last stage's setting%s", params,
                     f", validation {statistics.fmean(chosen.val):.4f} over "
                     f"{len(chosen.val)} new seed(s)" if chosen else " (the only candidate)")
            # its retrains with the final overrides; none (all failed): still the answer
            chosen = next((c for c in candidates(final) if c.params == params and c.val),
                          Candidate(params, [], []))
        if chosen is None or not chosen.val:
            return chosen
        test = statistics.fmean(chosen.test) if chosen.test else None
        self.log_metrics({f"final_{objective}": statistics.fmean(chosen.val),
                          f"final_{objective}_sd": Candidate.spread(chosen.val),
                          "final_test_acc": test,
                          "final_test_acc_sd": Candidate.spread(chosen.test),
                          "final_seeds": len(chosen.val)})
        log.info("final: %s %s, validation %.4f over %d seed(s)%s",
                 "chose" if compared is final else "retrained", chosen.params,
                 statistics.fmean(chosen.val), len(chosen.val),
                 f", test {test:.4f}" if test is not None else "")
        if test is None:
            log.warning("final retrain of %s has no test accuracy", chosen.params)
        return chosen

    def set_tags(self, tags: dict) -> None:
        self.spool.tags(tags)

    def _artifact(self, path: Path) -> None:
        self.spool.artifact(path)


def run_name(stage: str, number: int, params: dict | None = None) -> str:
    """'stage0-trial3 lam=0.00123' (the final step's retrains: 'final lam=...',
    'choose lam=...'): the runs list says which trial it is and what it tried."""
    name = stage if stage in (CHOOSE, FINAL) else f"stage{stage}-trial{number}"
    values = " ".join(f"{k}={v:.3g}" if _is_number(v) else f"{k}={v}"
                      for k, v in (params or {}).items())
    return f"{name} {values}" if values else name


def write_table(records: list[StageRecord], names: list[str], path: Path,
                objectives: tuple[str, ...] = ("val_acc",)) -> None:
    """One row per counted trial: stage, number, state (COMPLETE, PRUNED, FAIL), value
    (the first objective; a pruned trial's: its last reported), value_<objective> for
    each further objective, test_acc, pruned_at, then each parameter."""
    more = [f"value_{o}" for o in objectives[1:]]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*TABLE_COLUMNS[:4], *more, *TABLE_COLUMNS[4:], *names])
        for record in records:
            for t in record.trials:
                values = list(t.values or [])[:len(objectives)]
                values += [None] * (len(objectives) - len(values))
                out.writerow([record.label, t.number, t.state.name,
                              *("" if v is None else repr(v) for v in values),
                              t.user_attrs.get(TEST_ACC, ""), t.user_attrs.get(PRUNED_AT, ""),
                              *(t.params.get(n, "") for n in names)])


def _stage_plot(record: StageRecord, p: Param, best: list[FrozenTrial], path: Path) -> None:
    def points(trials):
        return [(t.params[p.name], first_value(t)) for t in trials
                if p.name in t.params and first_value(t) is not None]

    d = p.distribution
    plots.plot_search_stage(
        points(record.complete()), points(best),
        [t.params[p.name] for t in record.failed() if p.name in t.params], path,
        pruned=points(record.pruned()), param=p.name, span=(d.low, d.high), log_x=p.log,
        title=f"stage {record.label}: {p.name} in [{d.low:.3g}, {d.high:.3g}], "
              f"{len(record.trials)} trials")


def _numbers(prefix: str, params: dict) -> dict:
    return {prefix + k: v for k, v in params.items() if _is_number(v)}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


"""One worker's run of a staged search: the rules (`_rules`) applied to Optuna studies,
Hydra's launcher and the MLflow parent run (`_records`).

Each stage is its own Optuna study (its objective differs: more cycles, other data),
all in one storage; the study NAME holds the search's settings and the parent run's
id. A stage ends when its budget is counted and no trial of it runs anywhere, so every
worker narrows from the same trials. A failed or diverged trial is told FAIL and the
sweep goes on; a ConfigError/DataError naming no searched key would fail every trial
alike, so it stops the sweep, as does a stage with no complete trial (SweepFailed).
Before anything is recorded, each stage's first job is composed and validated.
Resuming (the same study_name and storage) requires the same search (`_rules.resume_diffs`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from pathlib import Path

import optuna
from hydra.core.override_parser.types import Transformer
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from mlplab.app import optuna_storage, store
from mlplab.app.config import ConfigError
from mlplab.app.passwords import mask_password
from mlplab.commands.common import terminate_as_interrupt
from mlplab.engine import threads
from mlplab.trial import PRUNER_ATTR, make_pruner

from . import _parallel, _pruning, _rules, _samplers, _space, _studies
from ._launch import Launching, StageRun
from ._records import ParentRun
from ._rules import CHOOSE, FAILURE, FINAL, Stage, StageRecord
from ._settings import (
    as_directions,
    check,
    check_jobs,
    check_resume,
    objectives,
    plan,
    search_settings,
    warm_entries,
    warm_points,
)
from ._space import Param
from ._studies import Heartbeat, Ledger

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # longest wait between looks at other workers' running trials
WORKER_LOST = "worker lost"  # the failure of a stale trial's run: its worker stopped


class SweepFailed(RuntimeError):
    """A stage ended with no complete trial."""


class Sweep(Launching):
    def __init__(self, settings: DictConfig, config: DictConfig, launcher, compose,
                 parent_run=None):
        """`compose(overrides)`: the job config those overrides make (Hydra's loader);
        `parent_run(experiment, sweep_dir)`: the sweep's record (default: an MLflow
        parent run, `_records.ParentRun`)."""
        self.sampler, self.pruner = check(settings)
        self.s, self.config, self.launcher = settings, config, launcher
        self.compose, self.parent_run = compose, parent_run
        self.directions = as_directions(settings.direction)
        self.objectives = objectives(settings)
        self.maximize = self.directions[0] == "maximize"  # how the first objective ranks
        if _pruning.prunes(self.pruner) and OmegaConf.select(config, "trial") is None:
            raise ConfigError(f"hydra.sweeper.pruner={settings.pruner!r}: the app's config "
                              "has no `trial` section for its jobs to report to (see "
                              "mlplab.trial); allowed 'none'", key="hydra.sweeper.pruner")
        if settings.final is not None and not isinstance(OmegaConf.select(
                config, settings.final.seed_key, default=None), int):
            raise ConfigError(f"hydra.sweeper.final.seed_key={settings.final.seed_key!r}: "
                              "the app's config has no such int key for the final step's "
                              "seeds; allowed the key that seeds a job (e.g. seed)",
                              key="hydra.sweeper.final.seed_key")
        self.worker = _studies.worker_id()
        self.helper = _parallel.is_helper()  # started by another worker of this sweep
        self.plan = _parallel.plan(threads.available_cores(), settings.workers,
                                   settings.n_jobs, config.hydra.launcher._target_,
                                   threads.blas_limit())
        if self.plan.workers > 1 and not self.helper and _parallel.command() is None:
            log.warning("hydra.sweeper.workers=%d: this process was not started as the "
                        "app's command (a test, a notebook), so it cannot start more "
                        "workers; running the trials one at a time", self.plan.workers)
            self.plan = dataclasses.replace(self.plan, workers=1)
        # Hydra's basic launcher composes each job in this process; others in theirs
        self.composes_here = config.hydra.launcher._target_ == _parallel.BASIC_LAUNCHER
        self.started = datetime.now()  # Optuna's trial times are local, naive
        self.job_idx = 0
        self.launched: dict[str, list[int]] = {}  # stage -> trial numbers run by this worker

    def run(self, arguments: list[str]) -> list[StageRecord]:
        s = self.s
        params_conf = [f"{k}={v}" for k, v in (s.params or {}).items()]
        params, fixed = _space.parse(params_conf + arguments)
        if not params:
            raise ConfigError("nothing to search: give hydra.sweeper.params or a sweep "
                              "override such as 'lam=tag(log, interval(1e-5, 1e-1))'")
        stages = plan(s)
        warm_given = warm_entries(params, OmegaConf.to_container(s.warm_start))
        # each sampled stage's start-up, refused before anything runs if it is the stage
        share = _pruning.bracket_share(self.pruner)
        self.startups = {st.label: _samplers.startup(self.sampler, st.n_trials, st.label, share)
                         for st in stages if not st.retrains}
        storage_url = self._storage_url()
        name = s.study_name or time.strftime("mlplab-sweep-%Y%m%d-%H%M%S")
        # the other workers start first: their start-up (imports, MLflow) overlaps this
        # one's; a bad setting found below, Ctrl-C or SIGTERM stops them with it
        with terminate_as_interrupt(), self._helpers(storage_url, name):
            check_jobs(self.config, self.compose, stages, params, fixed)
            # a worker back from an outage beats before the others would call it stale
            storage = optuna_storage.open_storage(
                storage_url, s.storage_wait_seconds,
                min(optuna_storage.MAX_RETRY_DELAY, s.stale_seconds / 4))
            # enqueued when stage 0's study is made: a resume reads no other study again
            fresh = not _studies.exists(storage, f"{name}.{stages[0].study_suffix}")
            self.warm = warm_points(params, warm_given, storage, stages[0].n_trials) \
                if fresh else []
            sweep_study, created = _studies.open_study(storage, name, self.directions)
            check_resume(sweep_study, storage, name, self.s.storage,
                         search_settings(s, params, stages, warm_given, self.pruner))
            self.stage_overrides = {st.label: st.overrides for st in stages}
            return self._run(stages, params, fixed, storage, storage_url, name,
                             sweep_study, created)

    def _helpers(self, storage_url: str | None, name: str) -> _parallel.Helpers:
        """The other local workers of the plan (none in a worker that is one): the same
        command with the same storage, study and worker count."""
        count = 0 if self.helper else self.plan.workers - 1
        same = [f"hydra.sweeper.workers={self.plan.workers}"]
        if self.s.storage is None and storage_url is not None:  # this run's journal
            same.append(f"hydra.sweeper.storage={Transformer.str(storage_url)}")
        if self.s.study_name is None:  # a name made up by this run
            same.append(f"hydra.sweeper.study_name={Transformer.str(name)}")
        if count:
            log.info("%d workers on %d cores, one trial at a time each", self.plan.workers,
                     self.plan.cores)
        return _parallel.Helpers(count, Path(self.config.hydra.sweep.dir), same)

    def _run(self, stages, params, fixed, storage, storage_url, name, sweep_study,
             created) -> list[StageRecord]:
        s = self.s
        # another app's sweep goes to an experiment named after it
        experiment = OmegaConf.select(self.config, "tracking.experiment",
                                      default=self.config.hydra.job.name)
        parent = (self.parent_run or self._mlflow_parent)(
            experiment, Path(self.config.hydra.sweep.dir))
        self.uri = parent.uri
        parent.attach(sweep_study, created, name, optuna_storage.describe_storage(storage_url),
                      mark_running=not self.helper)
        log.info("study %s (%s), worker %s, MLflow parent run %s in %s", name,
                 optuna_storage.describe_storage(storage_url), self.worker, parent.spool_id,
                 mask_password(self.uri))
        parent.log_params({
            "direction": " ".join(self.directions), "objectives": " ".join(self.objectives),
            "sampler": _samplers.describe(self.sampler),
            "seed": s.seed,
            "n_jobs": s.n_jobs, "workers": self.plan.workers, "cores": self.plan.cores,
            "top_k": s.top_k, "margin": s.margin,
            "pruner": " ".join(f"{k}={v}" for k, v in self.pruner.items()),
            "fixed_overrides": " ".join(fixed),
            **{f"space.{p.name}": _space.describe(p) for p in params},
            **{f"{st.study_suffix}.overrides": " ".join(st.overrides) for st in stages}})
        status, records = "FAILED", []
        try:
            if s.final is not None:  # tags, not write-once params: a resume may change them
                parent.set_tags({"final.top_m": s.final.top_m, "final.seeds": s.final.seeds,
                                "final.choose_in": s.final.choose_in})
            with terminate_as_interrupt(), Heartbeat(s.heartbeat_seconds) as heartbeat:
                for stage in stages:
                    ctx = self._open_stage(stage, storage, storage_url, name, fixed, parent,
                                           heartbeat)
                    record = self._run_retrains(ctx, records) if stage.retrains \
                        else self._run_stage(ctx, params, records)
                    records.append(record)
                    # a choose step with one candidate has nothing to retrain
                    if not record.complete() and (record.trials or stage.label != CHOOSE):
                        raise SweepFailed(
                            f"stage {stage.label}: none of its {len(record.trials)} trials "
                            "completed (failures: see the log and the trials' runs in "
                            "MLflow)")
            if not self.helper:  # the worker that started the others sums up
                self._summary(parent, records)
            status = "FINISHED"
        except SweepFailed:
            if not self.helper:
                self._summary(parent, records)  # what was tried
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.helper:
                parent.detach()
            else:
                parent.set_status(status)
        return records

    def _mlflow_parent(self, experiment: str, sweep_dir: Path) -> ParentRun:
        uri = store.resolve_uri(OmegaConf.select(self.config, "tracking.uri"))
        store.check_store(uri, experiment)  # a URI MLflow cannot use: now
        return ParentRun(uri, experiment, sweep_dir)

    def _summary(self, parent: ParentRun, records: list[StageRecord]) -> None:
        parent.write_summary(records, self.s.top_k, self.directions, tuple(self.objectives),
                             self.s.final.front_tolerance if self.s.final else 0.0)

    def _storage_url(self) -> str | None:
        """The configured storage; with a pruner or several workers and none
        configured, a journal file in the sweep's folder: the jobs and workers, in
        other processes, share it."""
        if self.s.storage is not None or (not _pruning.prunes(self.pruner)
                                          and self.plan.workers == 1):
            return self.s.storage
        return optuna_storage.JOURNAL_PREFIX + str(Path(self.config.hydra.sweep.dir)
                                             / "optuna-journal.log")

    def _open_stage(self, stage: Stage, storage, storage_url, name: str, fixed, parent,
                    heartbeat) -> StageRun:
        s = self.s
        study_name = f"{name}.{stage.study_suffix}"
        study, created = _studies.open_study(storage, study_name, self.directions)
        n_startup = None if stage.retrains else self.startups[stage.label]

        def make(seed):
            return _samplers.make(self.sampler, seed, n_startup)

        study.sampler = make(None) if s.seed is None else \
            _studies.SeededPerTrial(make, lambda n: self._seed(stage, n))
        prunes = not stage.retrains and _pruning.prunes(self.pruner)
        if prunes:  # for the jobs' pruner; Hyperband's brackets also steer the sampler
            study.set_user_attr(PRUNER_ATTR, self.pruner)
            study.pruner = make_pruner(self.pruner)
        ledger = Ledger(study, s.stale_seconds, on_stale=lambda trials: parent.mark_ended(
            stage.label, [t.number for t in trials], "FAILED", failure=WORKER_LOST))
        return StageRun(stage, study, ledger, fixed, parent, heartbeat,
                        storage_url if prunes else None, study_name, created)

    def _check_space(self, ctx: StageRun, spans: dict) -> None:
        """Record the stage's space and overrides, or check a resumed stage's: the same
        settings narrow to the same space; a study from older code checks here."""
        stage, study = ctx.stage, ctx.study
        for key, now in (("space", spans), ("overrides", stage.overrides)):
            was = study.user_attrs.get(key)
            if was is None:
                study.set_user_attr(key, now)
            elif was != now:
                raise ConfigError(
                    f"hydra.sweeper.study_name={ctx.study_name.rsplit('.', 1)[0]!r}: stage "
                    f"{stage.label} was started with {key} {was}, this run's is {now}; "
                    "resuming would mix them. Start a fresh search: "
                    "hydra.sweeper.study_name=NEW_NAME")

    def _run_stage(self, ctx: StageRun, params: list[Param],
                   records: list[StageRecord]) -> StageRecord:
        """A searched stage: sample until its budget is counted and nothing runs."""
        stage, s = ctx.stage, self.s
        space = params if not records else _rules.narrowed(records[-1], s.top_k, s.margin,
                                                          self.maximize)
        spans = {p.name: _space.describe(p) for p in space}
        self._check_space(ctx, spans)
        ctx.parent.log_params({f"{stage.study_suffix}.n_trials": stage.n_trials,
                               **{f"{stage.study_suffix}.space.{k}": v
                                  for k, v in spans.items()}})
        log.info("stage %s: %d trials, %s, overrides %s", stage.label, stage.n_trials,
                 ", ".join(f"{k} {v}" for k, v in spans.items()), stage.overrides or "none")
        if ctx.created:  # once, by the worker that made the study; the others wait
            if not records:
                for point in self.warm:
                    ctx.study.enqueue_trial(point, skip_if_exists=True)
                if self.warm:
                    log.info("stage %s: starts from %d given point(s) (warm_start)",
                             stage.label, len(self.warm))
            else:
                self._carry_forward(ctx, space, records)
            ctx.study.set_user_attr(_studies.READY, True)
        else:
            _studies.wait_until_ready(ctx.study)

        def within_budget(asked):
            return _rules.within_budget(ctx.ledger.trials(), stage.n_trials, asked)

        while True:
            todo = stage.n_trials - len(ctx.ledger.counted())
            if todo > 0:
                self._run_batch(ctx, [space] * min(todo, s.n_jobs), within_budget)
            elif not self._wait_for_others(ctx):
                break
        record = StageRecord(stage.label, space, ctx.ledger.finished())
        best = record.top(1, self.maximize)
        log.info("stage %s done: %d complete, %d pruned, %d failed%s", stage.label,
                 len(record.complete()), len(record.pruned()), len(record.failed()),
                 f"; best {_rules.first_value(best[0]):.4f} at {best[0].params}" if best
                 else "")
        return record

    def _carry_forward(self, ctx: StageRun, space: list[Param],
                       records: list[StageRecord]) -> None:
        """Give a model-based sampler the earlier stages' complete trials that trained
        as this stage does (the same overrides: the same objective) and lie in its
        space, marked as carried so that they count for nothing."""
        if not (self.s.carry_forward and _samplers.learns(self.sampler)):
            return
        # a median or percentile pruner would count them as its start-up trials
        if isinstance(make_pruner(self.pruner), optuna.pruners.PercentilePruner):
            log.info("stage %s: nothing carried forward: the %s pruner would take the "
                     "earlier trials for its n_startup_trials", ctx.stage.label,
                     _pruning.kind(self.pruner))
            return
        alike = _rules.alike(records, self.stage_overrides, ctx.stage.overrides)
        dists = {p.name: p.distribution for p in space}
        carried = [optuna.trial.create_trial(
            params=t.params, distributions=dists, values=t.values,
            user_attrs={_rules.CARRIED: f"stage{r.label} trial {t.number}"})
            for r in alike for t in r.complete() if _space.inside(space, t.params)]
        ctx.study.add_trials(carried)
        skipped = [r.label for r in records if r not in alike and r.label not in (CHOOSE, FINAL)]
        log.info("stage %s: its sampler learns from %d trial(s) of stage(s) %s%s",
                 ctx.stage.label, len(carried), [r.label for r in alike] or "none",
                 f" (not from stage(s) {skipped}: they trained otherwise)" if skipped else "")

    def _wait_for_others(self, ctx: StageRun) -> bool:
        """Whether trials of the stage still run elsewhere (then wait a little)."""
        running = [t for t in ctx.ledger.counted() if t.state == TrialState.RUNNING]
        if running:
            if not ctx.said_waiting:
                log.info("stage %s: waiting for %d trial(s) running elsewhere",
                         ctx.stage.label, len(running))
                ctx.said_waiting = True
            time.sleep(min(self.s.heartbeat_seconds, POLL_SECONDS))
        return bool(running)

    def _run_retrains(self, ctx: StageRun, records: list[StageRecord]) -> StageRecord:
        """The final step's slots (candidate, seed), each run until a trial of it
        completes; one that failed since this worker started is left to a re-run, by
        every worker, so all end the step with the same trials."""
        s, label = self.s, ctx.stage.label
        key = s.final.seed_key
        base = OmegaConf.select(self.compose([*ctx.fixed, *ctx.stage.overrides]), key)
        last, candidates, seeds = _rules.retrain_plan(
            records, label, s.final.top_m, s.final.seeds, base, self.directions,
            s.final.front_tolerance)
        log.info("%s: %s, %d seed(s) each", label, candidates, len(seeds))
        slots = [_space.seeded(last.params, c, key, seed) for c in candidates for seed in seeds]
        keys = [_rules.slot_key(_space.point(slot)) for slot in slots]
        tried: set = set()

        def first_of_their_slot(asked):
            names = {p.name for p in slots[0]}  # every slot sets these
            # another worker's trial gets its params one by one just after its ask: a
            # slot is known once all of them are in
            for _ in range(50):
                trials = ctx.ledger.trials()
                if all(set(t.params) >= names for t in trials
                       if t.state == TrialState.RUNNING and t.number < max(asked)):
                    break
                time.sleep(0.1)
            return _rules.first_of_their_slot(asked, trials, names)

        while True:
            taken = {_rules.slot_key(t.params) for t in ctx.ledger.trials()
                     if t.state in (TrialState.COMPLETE, TrialState.RUNNING)
                     or self._failed_meanwhile(t)} | tried
            todo = _rules.free_slots(keys, taken)[:s.n_jobs]
            if todo:
                tried |= {keys[i] for i in todo}
                self._run_batch(ctx, [slots[i] for i in todo], first_of_their_slot)
            elif not self._wait_for_others(ctx):
                break
        wanted = set(keys)
        trials = [t for t in ctx.ledger.finished() if _rules.slot_key(t.params) in wanted]
        return StageRecord(label, _space.seeded(last.params, candidates[0], key, base), trials,
                           candidates=candidates)

    def _failed_meanwhile(self, trial) -> bool:
        """Whether a trial failed with an outcome since this worker started: every
        worker of the sweep then leaves its slot alone (a re-run retries it), so they
        all end the step with the same trials and choose the same winner."""
        return (trial.state == TrialState.FAIL and FAILURE in trial.user_attrs
                and trial.datetime_complete is not None
                and trial.datetime_complete >= self.started)

    def _seed(self, stage: Stage, number: int) -> int | None:
        return None if self.s.seed is None else \
            _rules.trial_seed(self.s.seed, stage.index, number)

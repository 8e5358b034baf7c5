"""One worker's run of a staged search.

    stage 0:  n trials sampled from the space             (study NAME.stage0)
    stage i:  log intervals narrowed to the best top_k of stage i-1, its own overrides
    final:    the best top_m trials of the last stage, retrained with the final
              overrides and `seeds` seeds each; the best mean validation accuracy wins
              (final.choose_in=last_stage: they are compared first in the last stage's
              setting with new seeds, study NAME.choose; then only the winner
              retrains with the final overrides)
    summary:  trials.csv, plots, best values on the MLflow parent run

Each stage is its own Optuna study (its objective differs: more cycles, other data),
all in one storage; the study NAME itself only holds the sweep's parent run id. A
stage ends when its budget is counted and no trial of it is still running anywhere,
so every worker narrows from the same trials. Trials run in batches of `n_jobs`
through Hydra's launcher; a failed or diverged trial is told FAIL and the sweep
goes on. With a pruner, a job reports its validation accuracy to its trial as it
trains and stops when the pruner says so (see `_pruning`); the job's Outcome says
so, and the trial is told PRUNED. Counting, liveness and budgets: see `_studies`.
The final step is not sampled: each (candidate, seed) is a slot, run until a trial
of it completes or fails in this run (a re-run retries a failed one).

Failing early, as a single run does (ConfigError/DataError: the message names the key):
- before anything is recorded, each stage's first job is composed and validated;
- a job's ConfigError/DataError that names no searched key would fail every trial
  alike, so it stops the sweep (one that names a searched key, e.g. lam=-1, is that
  sample's fault: a failed trial);
- a stage with no complete trial fails the sweep (SweepFailed): nothing to go on from.

Resuming (the same study_name and storage) requires the same search: direction,
space, top_k, margin, pruner, the stages and their overrides, as stored on the study
NAME.
A stage's n_trials may grow (its finished trials still count) until the next stage
has started from it; it may not shrink. The final step's top_m, seeds and choose_in
may change: its retrains are slots, and those already done are kept. Other overrides
are not compared (paths differ between machines): keep them as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from hydra.core.override_parser.types import Transformer
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from mlplab import optuna_storage, threads, tracking
from mlplab.checks import non_negative, positive, positive_int, require
from mlplab.commands.common import terminate_as_interrupt
from mlplab.config import Config as MlplabConfig
from mlplab.config import ConfigError, keyed
from mlplab.data import DataError
from mlplab.experiment import validate as validate_config
from mlplab.passwords import mask_password
from mlplab.trial import PRUNER_ATTR, make_pruner, read_outcome

from . import _parallel, _pruning, _samplers, _space, _studies
from ._records import (
    CHOOSE,
    FINAL,
    MAX_TAG_LENGTH,
    PRUNED_AT,
    TEST_ACC,
    ParentRun,
    StageRecord,
    first_value,
    front_pick,
    pareto_front,
    run_name,
    winner,
)
from ._space import Param
from ._studies import DROPPED, FAILURE, WORKER, Heartbeat, Ledger

log = logging.getLogger(__name__)

_ABSENT = object()  # a key the app's config does not have
POLL_SECONDS = 0.5  # longest wait between looks at other workers' running trials
DIRECTIONS = ("maximize", "minimize")
CHOOSE_IN = ("final", "last_stage")  # where the final step compares its candidates
SETTINGS = "settings"  # the sweep study's user attribute: the search a resume must match
WORKER_LOST = "worker lost"  # the failure of a stale trial's run: its worker stopped
VAL_ACC = "val_acc"  # the default objective


class SweepFailed(RuntimeError):
    """A stage ended with no complete trial."""


@dataclass
class Stage:
    label: str  # "0", "1", ... or "final": the trials' `stage` tag
    index: int  # position in the sweep: metric step, seed stream
    n_trials: int
    overrides: list[str]

    @property
    def study_suffix(self) -> str:
        return study_suffix(self.label)

    @property
    def retrains(self) -> bool:
        """The final step's (choose, final): slots of chosen trials, not sampled."""
        return self.label in (CHOOSE, FINAL)


def study_suffix(label: str) -> str:
    """The stage's study is NAME.<this>: stage0, stage1, ..., choose, final."""
    return label if label in (CHOOSE, FINAL) else f"stage{label}"


def plan(s: DictConfig) -> list[Stage]:
    """The stages the settings describe, the final retrain (if any) last."""
    stages = list(s.stages) or [OmegaConf.create({"n_trials": None, "overrides": []})]
    out = []
    for i, st in enumerate(stages):
        n = s.n_trials if st.n_trials is None else st.n_trials
        if n < 1:
            raise ConfigError(f"hydra.sweeper.stages[{i}].n_trials={n}: must be >= 1")
        out.append(Stage(str(i), i, n, list(st.overrides)))
    if s.final is not None:
        compared, seeds = s.final.top_m, s.final.seeds
        if s.final.choose_in == "last_stage":  # then only the winner retrains in final
            out.append(Stage(CHOOSE, len(out), compared * seeds, out[-1].overrides))
            compared = 1
        out.append(Stage(FINAL, len(out), compared * seeds, list(s.final.overrides)))
    return out


def check(s: DictConfig) -> None:
    """Every hydra.sweeper setting checkable before anything runs (ConfigError naming
    the key, as the app's own checks do)."""
    with keyed("hydra.sweeper."):
        _check(s)
    _samplers.make(_samplers.spec(s.sampler), 0)  # bad names, arguments, packages: now
    _pruning.describe(s.pruner, s.pruning)


def _check(s: DictConfig) -> None:
    directions, names, final = as_directions(s.direction), objectives(s), s.final
    require(len(names) == len(directions), "objectives", names,
            f"one per direction ({len(directions)}: {directions})")
    # the jobs report their validation accuracy to the pruner, whatever is optimised
    # (several objectives: refused below, with Optuna's reason)
    require(s.pruner == "none" or names == [VAL_ACC] or len(names) > 1, "pruner", s.pruner,
            f"with objectives={names} a trial reports its val_acc to the pruner, so a "
            "pruner needs objectives [val_acc]; allowed none")
    if final is not None:
        non_negative("final.front_tolerance", final.front_tolerance)
        positive_int("final.top_m", final.top_m)
        positive_int("final.seeds", final.seeds)
        require(final.choose_in in CHOOSE_IN, "final.choose_in", final.choose_in,
                f"allowed {list(CHOOSE_IN)}")
    if len(directions) > 1:  # what Optuna and a single answer allow with a front
        require(s.pruner == "none", "pruner", s.pruner, "Optuna cannot prune a study of "
                f"several objectives (direction={directions}); allowed none")
        require(len(s.stages) <= 1, "stages", len(s.stages), "with several objectives a "
                "search has one stage (narrowing to the best has no single best); "
                "allowed 0 or 1")
        sampler = _samplers.spec(s.sampler)
        require(_samplers.handles_objectives(sampler, len(directions)), "sampler",
                _samplers.describe(sampler), "cannot search several objectives; allowed "
                "tpe, nsga2, random, qmc, gp")
        require(final is None or (final.top_m == 1 and final.choose_in == "final"),
                "final.top_m", final and final.top_m, "with several objectives the final "
                "step retrains the one front member final.front_tolerance picks; allowed "
                "top_m=1 and choose_in=final (seeds may be more)")
    positive_int("n_trials", s.n_trials)
    positive_int("n_jobs", s.n_jobs)
    require(s.workers is None or s.workers >= 1, "workers", s.workers,
            "allowed null (one per core) or an int >= 1")
    positive_int("top_k", s.top_k)
    non_negative("margin", s.margin)  # decades
    positive("heartbeat_seconds", s.heartbeat_seconds)
    non_negative("storage_wait_seconds", s.storage_wait_seconds)
    require(s.stale_seconds > s.heartbeat_seconds, "stale_seconds", s.stale_seconds,
            f"must exceed heartbeat_seconds={s.heartbeat_seconds}, or live trials would "
            "look stale")


def as_directions(direction) -> list[str]:
    """hydra.sweeper.direction as a list: one per objective."""
    out = [direction] if isinstance(direction, str) else \
        list(direction) if isinstance(direction, (list, ListConfig)) else None
    if not out or not all(d in DIRECTIONS for d in out):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: allowed {DIRECTIONS} or "
                          "a list of them, one per objective", key="hydra.sweeper.direction")
    return out


def objectives(s: DictConfig) -> list[str]:
    """The names of the outcome's metrics the trials are scored by (default val_acc)."""
    return list(s.objectives) if s.objectives is not None else [VAL_ACC]


WARM = "hydra.sweeper.warm_start"
FROM_STUDY = ("study", "storage", "top")  # a warm start from another study's best trials


def warm_entries(params: list[Param], given: list) -> list[dict]:
    """warm_start checked: each point in the space (a choice as the space stores it),
    or {study: NAME, storage: URL or null, top: N or null} with no other key."""
    out = []
    for i, entry in enumerate(given):
        if isinstance(entry, dict) and "study" in entry:
            extra = sorted(set(entry) - set(FROM_STUDY))
            if extra:
                raise ConfigError(f"{WARM}[{i}]: {extra} with 'study'; allowed keys "
                                  f"{list(FROM_STUDY)}", key=f"{WARM}[{i}]")
            top = entry.get("top")
            if top is not None and (not isinstance(top, int) or top < 1):
                raise ConfigError(f"{WARM}[{i}].top={top!r}: allowed null (all) or an int "
                                  ">= 1", key=f"{WARM}[{i}].top")
            out.append({k: entry.get(k) for k in FROM_STUDY})
        else:
            out += _space.warm_points(params, [entry], WARM, first=i)
    return out


def warm_points(params: list[Param], entries: list[dict], storage, n_trials: int) -> list[dict]:
    """The points stage 0 starts from: the given ones, and the best trials of the
    studies named, those that lie in this space (others are said and skipped)."""
    points = []
    for entry in entries:
        if set(entry) != set(FROM_STUDY):  # a point (warm_entries made study entries so)
            points.append(entry)
            continue
        other = storage if entry["storage"] is None \
            else optuna_storage.open_storage(entry["storage"])
        found = _studies.best_points(other, entry["study"], entry["top"])
        inside = [p for p in found if _space.inside(params, p)]
        log.info("warm start: %d of the %d best trials of study %s lie in this space",
                 len(inside), len(found), entry["study"])
        points += [_space.warm_points(params, [p], WARM)[0] for p in inside]
    if len(points) > n_trials:
        raise ConfigError(f"{WARM}: {len(points)} points for stage 0's {n_trials} trials; "
                          "allowed at most that many (a study's: set its top)", key=WARM)
    return points


def names_searched(err: Exception, params: list[Param]) -> bool:
    """Whether a ConfigError is about a searched key (that sample's fault)."""
    return getattr(err, "key", None) in {p.name for p in params}


def search_settings(s: DictConfig, params: list[Param], stages: list[Stage],
                    warm: list[dict]) -> dict:
    """What a resumed study must share with the run that started it (JSON for Optuna)."""
    directions = as_directions(s.direction)  # [maximize] is stored as maximize, as before
    return {"direction": directions[0] if len(directions) == 1 else directions,
            "objectives": objectives(s),
            "carry_forward": s.carry_forward,
            "space": {p.name: _space.describe(p) for p in params},
            "top_k": s.top_k, "margin": s.margin,
            "pruner": _pruning.describe(s.pruner, s.pruning),
            "warm_start": warm,
            "stages": [{"stage": st.label, "n_trials": st.n_trials,
                        "overrides": st.overrides} for st in stages]}


def narrowed(last: StageRecord, top_k: int, margin: float, maximize: bool) -> list[Param]:
    """The span of the last stage's best top_k complete trials; its own space when
    the pruner left fewer than two of them (one point is no span to search)."""
    top = last.top(top_k, maximize)
    if len(top) < min(top_k, 2):
        log.warning("stage %s: %d complete trial(s), the rest pruned or failed: the next "
                    "stage searches the same space (prune less: e.g. the median pruner's "
                    "n_startup_trials)", last.label, len(top))
        return last.params
    if top_k > 1 and last.pruned() and len(top) == len(last.complete()):
        log.warning("stage %s: top_k=%d takes all %d complete trials (%d pruned), so the "
                    "next stage spans them all, a poor one too: set hydra.sweeper.top_k "
                    "below the number the pruner lets finish (the median pruner's "
                    "n_startup_trials), or raise that", last.label, top_k, len(top),
                    len(last.pruned()))
    return _space.narrow(last.params, [t.params for t in top], margin)


@dataclass
class StageRun:
    """A stage as this worker runs it: what each batch of its trials needs."""

    stage: Stage
    study: object  # optuna.Study
    ledger: Ledger
    fixed: list[str]  # the sweep's overrides that are not searched
    parent: ParentRun
    heartbeat: Heartbeat
    storage: str | None  # where the jobs report to (None: they don't; no pruner)
    study_name: str
    created: bool = False  # this worker made the stage's study (and so enqueues in it)
    said_waiting: bool = False


class Sweep:
    def __init__(self, settings: DictConfig, config: DictConfig, launcher, compose):
        """`compose(overrides)`: the job config those overrides make (Hydra's loader)."""
        check(settings)
        self.s, self.config, self.launcher = settings, config, launcher
        self.compose = compose
        self.directions = as_directions(settings.direction)
        self.objectives = objectives(settings)
        self.maximize = self.directions[0] == "maximize"  # how the first objective ranks
        self.sampler = _samplers.spec(settings.sampler)
        self.pruner = _pruning.describe(settings.pruner, settings.pruning)
        if self.pruner["name"] != "none" and OmegaConf.select(config, "trial") is None:
            raise ConfigError(f"hydra.sweeper.pruner={settings.pruner!r}: the app's config "
                              "has no `trial` section for its jobs to report to (see "
                              "mlplab.trial); allowed 'none'", key="hydra.sweeper.pruner")
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
            self._check_config(stages, params, fixed)
            # a worker back from an outage beats before the others would call it stale
            storage = optuna_storage.open_storage(
                storage_url, s.storage_wait_seconds,
                min(optuna_storage.MAX_RETRY_DELAY, s.stale_seconds / 4))
            # enqueued when stage 0's study is made: a resume reads no other study again
            fresh = not _studies.exists(storage, f"{name}.{stages[0].study_suffix}")
            self.warm = warm_points(params, warm_given, storage, stages[0].n_trials) \
                if fresh else []
            sweep_study, created = _studies.open_study(storage, name, self.directions)
            self._check_resume(sweep_study, storage, name,
                               search_settings(s, params, stages, warm_given))
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
        self.uri = tracking.resolve_uri(OmegaConf.select(self.config, "tracking.uri"))
        experiment = OmegaConf.select(self.config, "tracking.experiment",
                                      default=self.config.hydra.job.name)
        tracking.check_store(self.uri, experiment)  # a URI MLflow cannot use: now
        parent = ParentRun(self.uri, experiment, Path(self.config.hydra.sweep.dir))
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

    def _summary(self, parent: ParentRun, records: list[StageRecord]) -> None:
        parent.write_summary(records, self.s.top_k, self.directions, tuple(self.objectives),
                             self.s.final.front_tolerance if self.s.final else 0.0)

    def _storage_url(self) -> str | None:
        """The configured storage; with a pruner or several workers and none
        configured, a journal file in the sweep's folder: the jobs and workers, in
        other processes, share it."""
        if self.s.storage is not None or (self.pruner["name"] == "none"
                                          and self.plan.workers == 1):
            return self.s.storage
        return optuna_storage.JOURNAL_PREFIX + str(Path(self.config.hydra.sweep.dir)
                                             / "optuna-journal.log")

    def _check_config(self, stages: list[Stage], params: list[Param], fixed) -> None:
        """Compose each stage's first job at a point of the space and validate it as a
        single run would: a bad value stops the sweep before anything is recorded.
        Only mlplab's own config: another app's jobs say what is wrong themselves."""
        if OmegaConf.get_type(self.config) is not MlplabConfig:
            return
        point = _space.sample(params)
        for stage in stages:
            job = self.compose([*fixed, *stage.overrides,
                                *(p.override(point[p.name]) for p in params)])
            with open_dict(job):
                del job["hydra"]  # the task's own config, as Hydra hands it to the job
            try:
                validate_config(job)
            except ConfigError as err:
                if not names_searched(err, params):
                    raise
                log.warning("stage %s: %s (at the point %s of the space): trials with "
                            "such values will fail", stage.label, err, point)

    def _check_resume(self, sweep_study, storage, name: str, wanted: dict) -> None:
        """Refuse to resume a study with another search (see the module's rules)."""
        stored = sweep_study.user_attrs.get(SETTINGS)
        if stored is None:  # a new study (or one from before settings were stored)
            sweep_study.set_user_attr(SETTINGS, wanted)
            return
        # from before pruning, warm starts existed
        stored = {"pruner": {"name": "none"}, "warm_start": [], "objectives": [VAL_ACC],
                  "carry_forward": True, **stored}
        diffs = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items()
                 if k != "stages" and stored.get(k) != v]
        # the final step may start or stop comparing in the last stage's setting: its
        # retrains are slots keyed by their params, which mean the same either way
        old, new = ([st for st in stages if st["stage"] != CHOOSE]
                    for stages in (stored.get("stages", []), wanted["stages"]))
        if [st["stage"] for st in old] != [st["stage"] for st in new]:
            diffs.append(f"stages {[st['stage'] for st in old]} -> "
                         f"{[st['stage'] for st in new]}")
            old = new = []
        for i, (was, now) in enumerate(zip(old, new, strict=True)):
            label = now["stage"]
            if was["overrides"] != now["overrides"]:
                diffs.append(f"stage {label} overrides {was['overrides']} -> "
                             f"{now['overrides']}")
            if label == FINAL:  # retrains are slots, not a budget: top_m, seeds may change
                continue
            if now["n_trials"] < was["n_trials"]:
                diffs.append(f"stage {label} n_trials {was['n_trials']} -> "
                             f"{now['n_trials']} (a budget may grow, not shrink)")
            elif now["n_trials"] > was["n_trials"] and i + 1 < len(new):
                after = new[i + 1]["stage"]
                started = [a for a in ([CHOOSE, FINAL] if after == FINAL else [after])
                           if _studies.exists(storage, f"{name}.{study_suffix(a)}")]
                if started:
                    diffs.append(f"stage {label} n_trials {was['n_trials']} -> "
                                 f"{now['n_trials']} (stage {started[0]} already started "
                                 "from its trials)")
        if diffs:
            raise ConfigError(
                f"hydra.sweeper.study_name={name!r}: this study in "
                f"{optuna_storage.describe_storage(self.s.storage)} was started with another "
                f"search ({'; '.join(diffs)}), and resuming would mix the two. Re-run with "
                "its settings, or start a fresh search: hydra.sweeper.study_name=NEW_NAME")
        if stored != wanted:  # a grown budget: the next resume compares with it
            sweep_study.set_user_attr(SETTINGS, wanted)

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
        prunes = not stage.retrains and self.pruner["name"] != "none"
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
        space = params if not records else narrowed(records[-1], s.top_k, s.margin,
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
            allowed = {t.number for t in ctx.ledger.counted()[:stage.n_trials]}
            return [t for t in asked if t.number in allowed]

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
                 f"; best {first_value(best[0]):.4f} at {best[0].params}" if best else "")
        return record

    def _carry_forward(self, ctx: StageRun, space: list[Param],
                       records: list[StageRecord]) -> None:
        """Give a model-based sampler the earlier stages' complete trials that trained
        as this stage does (the same overrides: the same objective) and lie in its
        space, marked as carried so that they count for nothing."""
        if not (self.s.carry_forward and _samplers.learns(self.sampler)):
            return
        if self.pruner["name"] == "median":  # it would count them as its start-up trials
            log.info("stage %s: nothing carried forward: the median pruner would take the "
                     "earlier trials for its n_startup_trials", ctx.stage.label)
            return
        alike = [r for r in records if r.label not in (CHOOSE, FINAL)
                 and self.stage_overrides[r.label] == ctx.stage.overrides]
        dists = {p.name: p.distribution for p in space}
        carried = [optuna.trial.create_trial(
            params=t.params, distributions=dists, values=t.values,
            user_attrs={_studies.CARRIED: f"stage{r.label} trial {t.number}"})
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
        """The final step's retrains, `seeds` seeds each with the stage's overrides: of
        the last stage's best top_m distinct configurations (stage choose, or final
        without one; seeds train.seed+1, ... in choose, train.seed, ... in final), or
        of the choose step's winner. Each (candidate, seed) is a slot, run until a
        trial of it completes; one that failed since this worker started is not
        retried before a re-run, by this worker or another."""
        s, label = self.s, ctx.stage.label
        last = next(r for r in reversed(records) if r.label != CHOOSE)
        top = last.top(s.final.top_m, self.maximize, distinct=True)
        if len(self.directions) > 1:  # the front member the stated rule picks
            picked = front_pick(pareto_front(last.trials, self.directions), self.directions,
                                s.final.front_tolerance)
            top = [picked] if picked is not None else []
        candidates = [t.params for t in top]
        base = self.compose([*ctx.fixed, *ctx.stage.overrides]).train.seed
        seeds = [base + i for i in range(s.final.seeds)]
        if label == CHOOSE:
            # not the stage's own seed: its draw is what put these trials on top, so it
            # favours them; a lone candidate needs no comparing
            seeds = [seed + 1 for seed in seeds] if len(top) > 1 else []
            log.info("choose: the best %d of stage %s, %d new seed(s) each in its "
                     "setting", len(top), last.label, s.final.seeds)
        elif records[-1].label == CHOOSE:
            candidates = [winner(records[-1], self.maximize)]
            log.info("final: %s retrained with the final overrides, %d seed(s)",
                     candidates[0], len(seeds))
        else:
            log.info("final: the best %d of stage %s, %d seed(s) each", len(candidates),
                     last.label, len(seeds))
        slots = [_space.seeded(last.params, c, seed) for c in candidates for seed in seeds]
        keys = [_slot_key(_space.point(slot)) for slot in slots]
        tried: set = set()

        def first_of_their_slot(asked):
            """Two workers may pick the same free slot at once: the lower trial number
            runs it, as the budget rule does for sampled stages."""
            latest = max(t.number for t in asked)
            keys = set(asked[0].params)  # every slot sets these (lam, train.seed, ...)
            # another worker's trial gets its params one by one just after its ask: a
            # slot is known once all of them are in
            for _ in range(50):
                trials = ctx.ledger.trials()
                if all(set(t.params) >= keys for t in trials
                       if t.state == TrialState.RUNNING and t.number < latest):
                    break
                time.sleep(0.1)
            holder = {}
            for t in sorted(trials, key=lambda t: t.number):
                if t.state in (TrialState.COMPLETE, TrialState.RUNNING) \
                        and set(t.params) >= keys:
                    holder.setdefault(_slot_key(t.params), t.number)
            return [t for t in asked if holder.get(_slot_key(t.params)) == t.number]

        while True:
            taken = {_slot_key(t.params) for t in ctx.ledger.trials()
                     if t.state in (TrialState.COMPLETE, TrialState.RUNNING)
                     or self._failed_meanwhile(t)} | tried
            todo = [slot for slot, key in zip(slots, keys, strict=True) if key not in taken]
            if todo:
                batch = todo[:s.n_jobs]
                tried |= {_slot_key(_space.point(slot)) for slot in batch}
                self._run_batch(ctx, batch, first_of_their_slot)
            elif not self._wait_for_others(ctx):
                break
        trials = [t for t in ctx.ledger.finished() if _slot_key(t.params) in set(keys)]
        return StageRecord(label, _space.seeded(last.params, candidates[0], base), trials,
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
            _studies.trial_seed(self.s.seed, stage.index, number)

    def _run_batch(self, ctx: StageRun, spaces: list[list[Param]], admit) -> None:
        """Ask a trial per space, keep those `admit(asked)` returns (the budget), launch
        them as one batch of jobs and tell each its outcome."""
        asked, told = [], set()
        try:
            for space in spaces:
                trial = ctx.study.ask()  # the sampler is seeded by its number
                trial.set_user_attr(WORKER, self.worker)
                ctx.heartbeat.add(trial)
                asked.append((trial, space))
                _space.suggest(trial, space)
            admitted = {t.number for t in admit([t for t, _ in asked])}
            for trial, _ in asked:
                if trial.number not in admitted:  # another worker took the last slots
                    log.info("stage %s: trial %d is over the budget (another worker "
                             "took the slot); dropped", ctx.stage.label, trial.number)
                    self._drop(ctx, trial, "over the budget: another worker took the slot")
                    told.add(trial.number)
            batch = [(t, space) for t, space in asked if t.number in admitted]
            if not batch:
                return
            overrides = [self._overrides(ctx, t, space) for t, space in batch]
            if not self.composes_here:  # fail here, not in the launcher's processes
                for job in overrides:
                    self.compose(job)
            self.launched.setdefault(ctx.stage.label, []).extend(t.number for t, _ in batch)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            fatal = None
            for (trial, space), ret in zip(batch, returns, strict=True):
                fatal = self._tell(ctx, trial, ret, space) or fatal
                ctx.heartbeat.remove(trial)
                told.add(trial.number)
            if fatal is not None:
                raise fatal
        except BaseException:
            # interrupted (Ctrl-C) or a config error: these trials did not run to an
            # outcome, so they leave the budget and a re-run replaces them
            unfinished = [t for t, _ in asked if t.number not in told]
            for trial in unfinished:
                self._drop(ctx, trial, "interrupted")
            try:
                # A launcher's workers may have been killed before closing their runs
                # (joblib does on Ctrl-C): any run of this worker's still RUNNING is over.
                ctx.parent.mark_ended(ctx.stage.label, sorted(
                    {t.number for t in unfinished}
                    | set(self.launched.get(ctx.stage.label, []))))
            except Exception as err:
                log.warning("could not mark interrupted child runs KILLED: %s", err)
            raise

    @staticmethod
    def _drop(ctx: StageRun, trial, reason: str) -> None:
        """Fail a trial that did not run to an outcome: it does not count."""
        ctx.heartbeat.remove(trial)
        try:
            trial.set_user_attr(DROPPED, reason)
        except Exception as err:  # told meanwhile, or the storage is away
            log.warning("trial %d: reason for dropping it not recorded (%s)",
                        trial.number, err)
        ctx.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def _overrides(self, ctx: StageRun, trial, space: list[Param]) -> list[str]:
        stage = ctx.stage
        report_to = [] if ctx.storage is None else [
            f"trial.storage={Transformer.str(optuna_storage.describe_storage(ctx.storage))}",
            f"trial.study={Transformer.str(ctx.study_name)}", f"trial.number={trial.number}"]
        # only where the app has the key (a foreign app's default 0: left alone)
        threads_ = _parallel.thread_override(self.plan, stage.n_trials, OmegaConf.select(
            self.config, "train.threads", default=0))
        tracked = [  # where the app records runs as mlplab does
            # masked: the job finds the real URI in $MLFLOW_TRACKING_URI (passwords.py)
            f"tracking.uri={Transformer.str(mask_password(self.uri))}",
            f"tracking.parent_spool_id={ctx.parent.spool_id}",
            f"tracking.spool_id={ctx.parent.child_spool_id(stage.label, trial.number)}",
            "tracking.run_name="
            + Transformer.str(run_name(stage.label, trial.number, trial.params)),
            f"++tags.stage={stage.label}", f"++tags.trial={trial.number}",
        ] if OmegaConf.select(self.config, "tracking.spool_id", default=_ABSENT) \
            is not _ABSENT else []
        return [*threads_, *ctx.fixed, *stage.overrides,
                *(p.override(trial.params[p.name]) for p in space), *tracked, *report_to]

    def _tell(self, ctx: StageRun, trial, ret, space) -> Exception | None:
        """Record the job's outcome on its trial; return the job's error if it must
        stop the sweep (a ConfigError/DataError no sample is to blame for)."""
        stage, study = ctx.stage, ctx.study
        failure = fatal = None
        values, test_acc, pruned_at = [math.nan], None, None
        try:
            returned = ret.return_value  # re-raises the job's exception
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"
            if isinstance(err, (ConfigError, DataError)) and not names_searched(err, space):
                fatal = err
        else:
            try:  # a number, numbers or an Outcome (mlplab.trial)
                outcome = read_outcome(returned, self.objectives)
                failure = outcome.failure
            except ValueError as err:  # every trial would return alike
                failure = str(err)
                fatal = ConfigError(f"hydra.sweeper.objectives={self.objectives}: {err}",
                                    key="hydra.sweeper.objectives")
            if failure is None:
                missing = [o for o in self.objectives if o not in outcome.final]
                if missing:  # every trial would miss it alike
                    failure = f"no objective {missing} in the task's outcome"
                    fatal = ConfigError(f"hydra.sweeper.objectives={self.objectives}: the "
                                        f"task's outcome has {sorted(outcome.final)}",
                                        key="hydra.sweeper.objectives")
                else:
                    values = [outcome.final[o] for o in self.objectives]
                    test_acc, pruned_at = outcome.final.get("test_acc"), outcome.pruned_at
                    if not all(isinstance(v, (int, float)) for v in values):
                        failure = f"objectives {self.objectives} are {values}: not numbers"
                        fatal = ConfigError(f"hydra.sweeper.objectives={self.objectives}: the "
                                            f"task's outcome has {values}; allowed numeric "
                                            "metrics", key="hydra.sweeper.objectives")
                    elif not all(math.isfinite(v) for v in values):
                        failure = f"diverged: the objective is {values}"
        try:
            if failure is None:
                if test_acc is not None:
                    trial.set_user_attr(TEST_ACC, test_acc)
                if pruned_at is not None:  # Optuna keeps its last reported value
                    trial.set_user_attr(PRUNED_AT, pruned_at)
                    study.tell(trial, state=TrialState.PRUNED)
                    log.info("stage %s trial %d: %s -> pruned at step %d (%.4f)",
                             stage.label, trial.number, trial.params, pruned_at, values[0])
                    return None
                study.tell(trial, values)
                log.info("stage %s trial %d: %s -> %s", stage.label, trial.number,
                         trial.params, " ".join(f"{v:.6g}" for v in values))
                return None
            if fatal is None:  # counted; a fatal error's trial is replaced after the fix
                trial.set_user_attr(FAILURE, failure[:MAX_TAG_LENGTH])
            else:
                trial.set_user_attr(DROPPED, "stopped the sweep: " + failure[:MAX_TAG_LENGTH])
            study.tell(trial, state=TrialState.FAIL)
        except Exception as err:  # failed as stale by another worker meanwhile
            log.warning("stage %s trial %d: result not recorded (%s)", stage.label,
                        trial.number, err)
            return fatal
        log.warning("stage %s trial %d FAILED: %s -> %s%s", stage.label, trial.number,
                    trial.params, failure.splitlines()[0],
                    "; every trial would fail alike: stopping the sweep" if fatal else "")
        ctx.parent.record_failure(stage.label, trial, trial.params, failure)
        return fatal


def _slot_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))

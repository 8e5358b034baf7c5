"""One worker's run of a staged search.

    stage 0:  n trials sampled from the space             (study NAME.stage0)
    stage i:  log intervals narrowed to the best top_k of stage i-1, its own overrides
    final:    the best trial of the last stage, retrained with the final overrides
    summary:  trials.csv, plots, best values on the MLflow parent run

Each stage is its own Optuna study (its objective differs: more cycles, other data),
all in one storage; the study NAME itself only holds the sweep's parent run id. A
stage ends when its budget is counted and no trial of it is still running anywhere,
so every worker narrows from the same trials. Trials run in batches of `n_jobs`
through Hydra's launcher; a failed or diverged trial is told FAIL and the sweep
goes on. Counting, liveness and budgets: see `_studies`.

Failing early, as a single run does (ConfigError/DataError: the message names the key):
- before anything is recorded, each stage's first job is composed and validated;
- a job's ConfigError/DataError that names no searched key would fail every trial
  alike, so it stops the sweep (one that names a searched key, e.g. lam=-1, is that
  sample's fault: a failed trial);
- a stage with no complete trial fails the sweep (SweepFailed): nothing to go on from.

Resuming (the same study_name and storage) requires the same search: direction,
space, top_k, margin, the stages and their overrides, as stored on the study NAME.
A stage's n_trials may grow (its finished trials still count) until the next stage
has started from it; it may not shrink. Other overrides are not compared (paths
differ between machines): keep them as they were.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from hydra.core.override_parser.types import Transformer
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from mlplab import tracking
from mlplab.commands.common import terminate_as_interrupt
from mlplab.config import ConfigError
from mlplab.data import DataError
from mlplab.experiment import validate as validate_config
from mlplab.passwords import mask_password

from . import _space, _studies
from ._records import FINAL, MAX_TAG_LENGTH, TEST_ACC, ParentRun, StageRecord, run_name
from ._space import Param
from ._studies import FAILURE, WORKER, Heartbeat, Ledger

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # longest wait between looks at other workers' running trials
DIRECTIONS = ("maximize", "minimize")
SETTINGS = "settings"  # the sweep study's user attribute: the search a resume must match
WORKER_LOST = "worker lost"  # the failure of a stale trial's run: its worker stopped


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
        return FINAL if self.label == FINAL else f"stage{self.label}"


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
        out.append(Stage(FINAL, len(stages), 1, list(s.final.overrides)))
    return out


def check(s: DictConfig) -> None:
    def require(ok, message):
        if not ok:
            raise ConfigError(f"hydra.sweeper.{message}")

    require(s.direction in DIRECTIONS, f"direction={s.direction!r}: allowed {DIRECTIONS}")
    require(s.n_trials >= 1, f"n_trials={s.n_trials}: must be >= 1")
    require(s.n_jobs >= 1, f"n_jobs={s.n_jobs}: must be >= 1")
    require(s.top_k >= 1, f"top_k={s.top_k}: must be >= 1")
    require(s.margin >= 0, f"margin={s.margin}: must be >= 0 (decades)")
    require(s.heartbeat_seconds > 0, f"heartbeat_seconds={s.heartbeat_seconds}: must be > 0")
    require(s.stale_seconds > s.heartbeat_seconds,
            f"stale_seconds={s.stale_seconds}: must exceed heartbeat_seconds="
            f"{s.heartbeat_seconds}, or live trials would look stale")
    _studies.make_sampler(s.sampler, 0)  # unknown names and missing packages fail now


def names_searched(err: Exception, params: list[Param]) -> bool:
    """Whether a ConfigError is about a searched key (that sample's fault)."""
    return getattr(err, "key", None) in {p.name for p in params}


def search_settings(s: DictConfig, params: list[Param], stages: list[Stage]) -> dict:
    """What a resumed study must share with the run that started it (JSON for Optuna)."""
    return {"direction": s.direction, "space": {p.name: _space.describe(p) for p in params},
            "top_k": s.top_k, "margin": s.margin,
            "stages": [{"stage": st.label, "n_trials": st.n_trials,
                        "overrides": st.overrides} for st in stages]}


class Sweep:
    def __init__(self, settings: DictConfig, config: DictConfig, launcher, compose):
        """`compose(overrides)`: the job config those overrides make (Hydra's loader)."""
        check(settings)
        self.s, self.config, self.launcher = settings, config, launcher
        self.compose = compose
        self.maximize = settings.direction == "maximize"
        self.worker = _studies.worker_id()
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
        self._check_config(stages, params, fixed)
        storage = _studies.open_storage(s.storage)
        name = s.study_name or time.strftime("mlplab-sweep-%Y%m%d-%H%M%S")
        sweep_study, created = _studies.open_study(storage, name, s.direction)
        self._check_resume(sweep_study, storage, name, search_settings(s, params, stages))
        self.uri = tracking.resolve_uri(self.config.tracking.uri)
        parent = ParentRun(self.uri, self.config.tracking.experiment)
        parent.attach(sweep_study, created, name, _studies.describe_storage(s.storage))
        log.info("study %s (%s), worker %s, MLflow parent run %s in %s", name,
                 _studies.describe_storage(s.storage), self.worker, parent.run_id,
                 mask_password(self.uri))
        parent.log_params({
            "direction": s.direction, "sampler": s.sampler, "seed": s.seed,
            "n_jobs": s.n_jobs, "top_k": s.top_k, "margin": s.margin,
            "fixed_overrides": " ".join(fixed),
            **{f"space.{p.name}": _space.describe(p) for p in params},
            **{f"{st.study_suffix}.overrides": " ".join(st.overrides) for st in stages}})
        status, records = "FAILED", []
        try:
            with terminate_as_interrupt(), Heartbeat(s.heartbeat_seconds) as heartbeat:
                self._run_stages(stages, params, fixed, storage, name, parent, heartbeat,
                                 records)
            parent.write_summary(records, s.top_k, self.maximize)
            status = "FINISHED"
        except SweepFailed:
            parent.write_summary(records, s.top_k, self.maximize)  # what was tried
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            parent.set_status(status)
        return records

    def _check_config(self, stages: list[Stage], params: list[Param], fixed) -> None:
        """Compose each stage's first job at a point of the space and validate it as a
        single run would: a bad value stops the sweep before anything is recorded."""
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
        diffs = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items()
                 if k != "stages" and stored.get(k) != v]
        old, new = stored.get("stages", []), wanted["stages"]
        if [st["stage"] for st in old] != [st["stage"] for st in new]:
            diffs.append(f"stages {[st['stage'] for st in old]} -> "
                         f"{[st['stage'] for st in new]}")
            old = new = []
        for i, (was, now) in enumerate(zip(old, new, strict=True)):
            label = now["stage"]
            if was["overrides"] != now["overrides"]:
                diffs.append(f"stage {label} overrides {was['overrides']} -> "
                             f"{now['overrides']}")
            if now["n_trials"] < was["n_trials"]:
                diffs.append(f"stage {label} n_trials {was['n_trials']} -> "
                             f"{now['n_trials']} (a budget may grow, not shrink)")
            elif now["n_trials"] > was["n_trials"] and i + 1 < len(new):
                after = Stage(new[i + 1]["stage"], i + 1, 0, [])
                if _studies.exists(storage, f"{name}.{after.study_suffix}"):
                    diffs.append(f"stage {label} n_trials {was['n_trials']} -> "
                                 f"{now['n_trials']} (stage {after.label} already started "
                                 "from its trials)")
        if diffs:
            raise ConfigError(
                f"hydra.sweeper.study_name={name!r}: this study in "
                f"{_studies.describe_storage(self.s.storage)} was started with another "
                f"search ({'; '.join(diffs)}), and resuming would mix the two. Re-run with "
                "its settings, or start a fresh search: hydra.sweeper.study_name=NEW_NAME")
        if stored != wanted:  # a grown budget: the next resume compares with it
            sweep_study.set_user_attr(SETTINGS, wanted)

    def _run_stages(self, stages, params, fixed, storage, name, parent, heartbeat,
                    records: list[StageRecord]) -> None:
        """Run the stages, appending each one's record to `records`."""
        space = params
        for stage in stages:
            if stage.label == FINAL:
                space = _space.pinned(params, records[-1].top(1, self.maximize)[0].params)
            elif records:
                top = records[-1].top(self.s.top_k, self.maximize)
                space = _space.narrow(space, [t.params for t in top], self.s.margin)
            record = self._run_stage(stage, space, fixed, storage, name, parent, heartbeat)
            records.append(record)
            if not record.complete():
                raise SweepFailed(
                    f"stage {stage.label}: none of its {len(record.trials)} trials "
                    "completed (failures: see the log and the trials' runs in MLflow)")

    def _run_stage(self, stage: Stage, space: list[Param], fixed, storage, name, parent,
                   heartbeat) -> StageRecord:
        s = self.s
        study, created = _studies.open_study(storage, f"{name}.{stage.study_suffix}",
                                             s.direction)
        study.sampler = _studies.make_sampler(s.sampler, None) if s.seed is None else \
            _studies.SeededPerTrial(s.sampler, lambda n: self._seed(stage, n))
        spans = {p.name: _space.describe(p) for p in space}
        if created:
            study.set_user_attr("space", spans)
            study.set_user_attr("overrides", stage.overrides)
        else:  # same settings narrow to the same space; a study from older code checks here
            for key, now in (("space", spans), ("overrides", stage.overrides)):
                was = study.user_attrs.get(key, now)
                if was != now:
                    raise ConfigError(
                        f"hydra.sweeper.study_name={name!r}: stage {stage.label} was "
                        f"started with {key} {was}, this run's is {now}; resuming would "
                        "mix them. Start a fresh search: hydra.sweeper.study_name=NEW_NAME")
        parent.log_params({f"{stage.study_suffix}.n_trials": stage.n_trials,
                           **{f"{stage.study_suffix}.space.{k}": v for k, v in spans.items()}})
        log.info("stage %s: %d trials, %s, overrides %s", stage.label, stage.n_trials,
                 ", ".join(f"{k} {v}" for k, v in spans.items()), stage.overrides or "none")
        ledger = Ledger(study, s.stale_seconds, on_stale=lambda trials: parent.mark_ended(
            stage.label, [t.number for t in trials], "FAILED", failure=WORKER_LOST))
        said_waiting = False
        while True:
            counted = ledger.counted()
            todo = stage.n_trials - len(counted)
            if todo > 0:
                self._run_batch(stage, study, ledger, space, fixed, parent, heartbeat,
                                min(todo, s.n_jobs))
                continue
            running = [t for t in counted if t.state == TrialState.RUNNING]
            if not running:
                break
            if not said_waiting:
                log.info("stage %s: budget taken; waiting for %d trial(s) running "
                         "elsewhere", stage.label, len(running))
                said_waiting = True
            time.sleep(min(s.heartbeat_seconds, POLL_SECONDS))
        record = StageRecord(stage.label, space, ledger.finished())
        best = record.top(1, self.maximize)
        log.info("stage %s done: %d complete, %d failed%s", stage.label,
                 len(record.complete()), len(record.trials) - len(record.complete()),
                 f"; best {best[0].value:.4f} at {best[0].params}" if best else "")
        return record

    def _seed(self, stage: Stage, number: int) -> int | None:
        return None if self.s.seed is None else \
            _studies.trial_seed(self.s.seed, stage.index, number)

    def _run_batch(self, stage, study, ledger, space, fixed, parent, heartbeat, size):
        asked, told = [], set()
        try:
            for _ in range(size):
                trial = study.ask()  # the sampler is seeded by its number (SeededPerTrial)
                trial.set_user_attr(WORKER, self.worker)
                heartbeat.add(trial)
                asked.append(trial)
                _space.suggest(trial, space)
            allowed = {t.number for t in ledger.counted()[:stage.n_trials]}
            batch = [t for t in asked if t.number in allowed]
            for trial in asked:
                if trial.number not in allowed:  # another worker took the last slots
                    log.info("stage %s: trial %d is over the budget; dropped", stage.label,
                             trial.number)
                    self._tell_uncounted(study, trial, heartbeat)
                    told.add(trial.number)
            if not batch:
                return
            overrides = [self._overrides(stage, t, space, fixed, parent) for t in batch]
            for job in overrides:  # fails here, not in the launcher's process
                self.compose(job)
            self.launched.setdefault(stage.label, []).extend(t.number for t in batch)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            fatal = None
            for trial, ret in zip(batch, returns, strict=True):
                fatal = self._tell(stage, study, trial, ret, space, parent) or fatal
                heartbeat.remove(trial)
                told.add(trial.number)
            if fatal is not None:
                raise fatal
        except BaseException:
            # interrupted (Ctrl-C) or a config error: these trials did not run to an
            # outcome, so they leave the budget and a re-run replaces them
            unfinished = [t for t in asked if t.number not in told]
            for trial in unfinished:
                self._tell_uncounted(study, trial, heartbeat)
            try:
                # A launcher's workers may have been killed before closing their runs
                # (joblib does on Ctrl-C): any run of this worker's still RUNNING is over.
                parent.mark_ended(stage.label, sorted(
                    {t.number for t in unfinished} | set(self.launched.get(stage.label, []))))
            except Exception as err:
                log.warning("could not mark interrupted child runs KILLED: %s", err)
            raise

    @staticmethod
    def _tell_uncounted(study, trial, heartbeat) -> None:
        heartbeat.remove(trial)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def _overrides(self, stage: Stage, trial, space: list[Param], fixed, parent) -> list[str]:
        return [*fixed, *stage.overrides,
                *(p.override(trial.params[p.name]) for p in space),
                # masked: the job finds the real URI in $MLFLOW_TRACKING_URI (passwords.py)
                f"tracking.uri={Transformer.str(mask_password(self.uri))}",
                f"tracking.parent_run_id={parent.run_id}",
                "tracking.run_name="
                + Transformer.str(run_name(stage.label, trial.number, trial.params)),
                f"++tags.stage={stage.label}", f"++tags.trial={trial.number}"]

    def _tell(self, stage: Stage, study, trial, ret, space, parent) -> Exception | None:
        """Record the job's outcome on its trial; return the job's error if it must
        stop the sweep (a ConfigError/DataError no sample is to blame for)."""
        failure = fatal = None
        try:
            value = float(ret.return_value)  # re-raises the job's exception
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"
            if isinstance(err, (ConfigError, DataError)) and not names_searched(err, space):
                fatal = err
        else:
            if not math.isfinite(value):
                failure = f"diverged: the objective is {value}"
        try:
            if failure is None:
                if stage.label == FINAL:
                    test_acc = parent.test_accuracy(FINAL, trial.number)
                    if test_acc is not None:
                        trial.set_user_attr(TEST_ACC, test_acc)
                study.tell(trial, value)
                log.info("stage %s trial %d: %s -> %.4f", stage.label, trial.number,
                         trial.params, value)
                return
            if fatal is None:  # counted; a fatal error's trial is replaced after the fix
                trial.set_user_attr(FAILURE, failure[:MAX_TAG_LENGTH])
            study.tell(trial, state=TrialState.FAIL)
        except Exception as err:  # failed as stale by another worker meanwhile
            log.warning("stage %s trial %d: result not recorded (%s)", stage.label,
                        trial.number, err)
            return fatal
        log.warning("stage %s trial %d FAILED: %s -> %s%s", stage.label, trial.number,
                    trial.params, failure.splitlines()[0],
                    "; every trial would fail alike: stopping the sweep" if fatal else "")
        parent.record_failure(stage.label, trial, trial.params, failure)
        return fatal

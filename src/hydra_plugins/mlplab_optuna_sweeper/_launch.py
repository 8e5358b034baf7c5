"""Running trials through Hydra's launcher: ask Optuna for a batch, launch it, tell
each trial its outcome (`_rules.verdict`); trials that did not run to an outcome are
dropped, so a re-run replaces them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hydra.core.override_parser.types import Transformer
from omegaconf import OmegaConf
from optuna.trial import TrialState

from mlplab.app import optuna_storage
from mlplab.app.config import ConfigError
from mlplab.app.passwords import mask_password
from mlplab.app.store import MAX_TAG_LENGTH
from mlplab.engine.data import DataError

from . import _parallel, _rules, _space
from ._records import ParentRun, run_name
from ._rules import DROPPED, FAILURE, PRUNED_AT, TEST_ACC, Stage
from ._settings import names_searched
from ._space import Param
from ._studies import WORKER, Heartbeat, Ledger

log = logging.getLogger(__name__)

_ABSENT = object()  # a key the app's config does not have


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


class Launching:
    """The part of a `_driver.Sweep` that runs a batch of a stage's trials."""

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
            admitted = set(admit([t.number for t, _ in asked]))
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
        """Record the job's outcome on its trial; return the error that must stop the
        sweep (every trial would fail alike), if any."""
        stage, study = ctx.stage, ctx.study
        try:
            verdict = _rules.verdict(ret.return_value, self.objectives)  # re-raises the job's
            fatal = None if verdict.fatal is None else ConfigError(
                f"hydra.sweeper.objectives={self.objectives}: {verdict.fatal}",
                key="hydra.sweeper.objectives")
        except Exception as err:
            verdict = _rules.Verdict(failure=f"{type(err).__name__}: {err}")
            fatal = err if isinstance(err, (ConfigError, DataError)) \
                and not names_searched(err, space) else None
        try:
            if verdict.failure is None:
                if verdict.test_acc is not None:
                    trial.set_user_attr(TEST_ACC, verdict.test_acc)
                if verdict.pruned_at is not None:  # Optuna keeps its last reported value
                    trial.set_user_attr(PRUNED_AT, verdict.pruned_at)
                    study.tell(trial, state=TrialState.PRUNED)
                    log.info("stage %s trial %d: %s -> pruned at step %d (%.4f)",
                             stage.label, trial.number, trial.params, verdict.pruned_at,
                             verdict.values[0])
                    return None
                study.tell(trial, verdict.values)
                log.info("stage %s trial %d: %s -> %s", stage.label, trial.number,
                         trial.params, " ".join(f"{v:.6g}" for v in verdict.values))
                return None
            failure = verdict.failure[:MAX_TAG_LENGTH]
            if fatal is None:  # counted; a fatal error's trial is replaced after the fix
                trial.set_user_attr(FAILURE, failure)
            else:
                trial.set_user_attr(DROPPED, "stopped the sweep: " + failure)
            study.tell(trial, state=TrialState.FAIL)
        except Exception as err:  # failed as stale by another worker meanwhile
            log.warning("stage %s trial %d: result not recorded (%s)", stage.label,
                        trial.number, err)
            return fatal
        log.warning("stage %s trial %d FAILED: %s -> %s%s", stage.label, trial.number,
                    trial.params, verdict.failure.splitlines()[0],
                    "; every trial would fail alike: stopping the sweep" if fatal else "")
        ctx.parent.record_failure(stage.label, trial, trial.params, verdict.failure)
        return fatal

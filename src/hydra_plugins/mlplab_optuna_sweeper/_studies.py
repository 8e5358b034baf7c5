"""The Optuna storage shared by workers: studies, the trials that count (`_rules.counts`),
liveness. A RUNNING trial is alive while its worker writes a `heartbeat` user
attribute; one silent for `stale_seconds` belongs to a worker that was killed: it is
failed without a `failure`, so it stops counting and is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlplab.app.config import ConfigError
from mlplab.app.optuna_storage import Patient
from mlplab.app.store import with_retries

from . import _rules
from ._rules import CARRIED

log = logging.getLogger(__name__)

HEARTBEAT, WORKER = "heartbeat", "worker"
READY = "ready"  # a stage study's attribute: its creator has put its first trials in
READY_WAIT_SECONDS = 30.0

optuna.logging.set_verbosity(optuna.logging.WARNING)  # we log each trial ourselves


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class SeededPerTrial(optuna.samplers.BaseSampler):
    """The sampler `make(seed)` gives, made afresh for each trial with the seed
    `seed_of(number)`.

    The number is the one the storage gave the trial, read in `before_trial`, which
    Optuna calls when the trial is created and before anything is sampled for it:
    two workers asking at once get different numbers, hence different draws (a
    number counted before `ask` can be taken by the other worker meanwhile)."""

    def __init__(self, make, seed_of):
        self.make, self.seed_of = make, seed_of
        self.sampler = make(None)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self.sampler = self.make(self.seed_of(trial.number))
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)


def open_study(storage, name: str, directions: list[str]) -> tuple[optuna.Study, bool]:
    """Load the study `name`, or create it; True when this worker created it."""

    def attempt():
        try:
            return optuna.create_study(storage=storage, study_name=name,
                                       directions=directions), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(storage=storage, study_name=name), False

    return with_retries(attempt)


def exists(storage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def wait_until_ready(study: optuna.Study) -> None:
    """A worker that did not create a stage's study waits for its creator to enqueue
    the warm-start points and carry earlier trials in, so every worker's first draw
    sees them (a study with a trial past WAITING was set up, by older code too)."""
    deadline = time.monotonic() + READY_WAIT_SECONDS
    while time.monotonic() < deadline:
        if READY in study.user_attrs or any(
                t.state != TrialState.WAITING and CARRIED not in t.user_attrs
                for t in study.get_trials(deepcopy=False)):
            return
        time.sleep(0.2)
    log.warning("study %s: its creator did not finish setting it up in %.0f s; going on",
                study.study_name, READY_WAIT_SECONDS)


def best_points(storage, name: str, top: int | None) -> list[dict]:
    """The params of the best `top` (None: all) complete trials of another study, best
    first; with several objectives, its Pareto front. ConfigError naming the studies
    the storage holds when `name` is not one of them."""
    try:
        study = optuna.load_study(storage=storage, study_name=name)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        raise ConfigError(f"hydra.sweeper.warm_start: no study {name!r} in that storage; "
                          f"allowed {names}", key="hydra.sweeper.warm_start") from None
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE and CARRIED not in t.user_attrs]
    directions = [d.name.lower() for d in study.directions]
    if len(directions) > 1:
        ranked = _rules.pareto_front(complete, directions)
    else:
        sign = -1 if directions[0] == "maximize" else 1
        ranked = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
    return [dict(t.params) for t in ranked[:top]]


def _last_sign_of_life(t: FrozenTrial) -> float:
    beat = t.user_attrs.get(HEARTBEAT)
    if beat is not None:
        return float(beat)
    return t.datetime_start.timestamp() if t.datetime_start else 0.0


class Ledger:
    """What counts in one study, read fresh from the storage on each call.
    `on_stale(trials)` hears of the trials it failed as stale."""

    def __init__(self, study: optuna.Study, stale_seconds: float, on_stale=None):
        self.study, self.stale_seconds = study, stale_seconds
        self.on_stale = on_stale

    def trials(self) -> list[FrozenTrial]:
        """All trials, after failing the stale ones (so they no longer count)."""
        trials = self.study.get_trials(deepcopy=False)
        now = time.time()
        # no heartbeat could be written while the database was away: count from its return
        stale = [t for t in trials if t.state == TrialState.RUNNING
                 and now - max(_last_sign_of_life(t), Patient.recovered_at)
                 >= self.stale_seconds]
        for t in stale:
            log.warning("trial %d of %s: no heartbeat for %.0f s, its worker stopped; "
                        "failing it (not counted, it will be replaced)", t.number,
                        self.study.study_name, now - _last_sign_of_life(t))
            # another worker, looking at the same moment, may have failed it first
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if not stale:
            return trials
        if self.on_stale is not None:
            self.on_stale(stale)
        return self.study.get_trials(deepcopy=False)

    def counted(self) -> list[FrozenTrial]:
        return _rules.counted(self.trials())

    def finished(self) -> list[FrozenTrial]:
        """Counted trials that are done: the stage's record."""
        return [t for t in self.counted() if t.state != TrialState.RUNNING]


class Heartbeat:
    """A thread that stamps this worker's running trials every `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._trials: dict[int, optuna.Trial] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlplab-heartbeat",
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def add(self, trial: optuna.Trial) -> None:
        self._beat(trial)
        with self._lock:
            self._trials[id(trial)] = trial

    def remove(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._trials.pop(id(trial), None)

    def _run(self):
        while not self._stop.wait(self.seconds):
            with self._lock:
                trials = list(self._trials.values())
            for trial in trials:
                self._beat(trial)

    @staticmethod
    def _beat(trial: optuna.Trial) -> None:
        try:
            trial.set_user_attr(HEARTBEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told meanwhile: nothing left to keep alive
        except Exception as err:  # the storage is busy or away: try again next time
            log.warning("heartbeat of trial %d failed: %s", trial.number, err)

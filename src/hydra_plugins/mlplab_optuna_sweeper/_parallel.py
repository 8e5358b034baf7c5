"""Trials in parallel on one machine: the plan (workers, BLAS threads per trial) and
the local worker processes.

A Hydra launcher returns when its whole batch has ended, so the sweeper instead starts
`workers - 1` more copies of its own command; each takes the next free trial as soon
as it is done, sharing the budget through the Optuna storage. The plan is a fixed
function of the core count and the settings, never of a timing: one worker per core
with Hydra's basic launcher (else 1), and per trial the cores shared by the trials
that run at once, within a BLAS limit the user set (`train.threads` given wins).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HELPER_ENV = "MLPLAB_SWEEP_HELPER"  # set in the workers a sweep starts: their number
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
# launchers whose jobs run on this machine, sharing its cores
LOCAL_LAUNCHERS = (BASIC_LAUNCHER, "hydra_plugins.hydra_joblib_launcher",
                   "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")
STOP_SECONDS = 30.0  # how long a worker has to end its trial after SIGTERM
PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent dies


@dataclass(frozen=True)
class Plan:
    cores: int
    workers: int  # processes running trials, this one included
    per_batch: int  # trials a worker's launcher runs at once
    local: bool  # the trials run on this machine
    max_threads: int | None = None  # a BLAS limit the user set (OPENBLAS_NUM_THREADS)

    def threads(self, slots: int) -> int | None:
        """BLAS threads of a trial of a stage with `slots` trials; None: the trial's
        own machine decides (not this one's cores)."""
        if not self.local:
            return None
        share = max(1, self.cores // max(1, min(self.workers * self.per_batch, slots)))
        return min(share, self.max_threads or share)


def plan(cores: int, workers: int | None, n_jobs: int, launcher: str,
         max_threads: int | None = None) -> Plan:
    """The plan for a machine with `cores` cores and the sweeper's settings. The basic
    launcher runs a batch's jobs one after the other: one trial at a time a worker."""
    basic = launcher == BASIC_LAUNCHER
    local = launcher.startswith(LOCAL_LAUNCHERS)
    if workers is None:
        workers = cores if basic else 1
    return Plan(cores, workers, 1 if basic else n_jobs, local, max_threads)


def thread_override(plan: Plan, slots: int, configured: int | None) -> list[str]:
    """The trial's `train.threads=` override: none where the trial's machine decides
    or the config already sets it (the user's choice wins)."""
    threads = plan.threads(slots)
    return [] if threads is None or configured is not None else [f"train.threads={threads}"]


def command() -> list[str] | None:
    """The command line that started this process, to start more workers with, or None
    when this process was not started as the Hydra app it runs (a test, a notebook)."""
    argv = list(getattr(sys, "orig_argv", []))
    args = sys.argv[1:]
    if len(argv) <= len(args) or argv[len(argv) - len(args):] != args:
        return None
    return argv[:len(argv) - len(args)] + args


def is_helper() -> bool:
    """Whether this process is a worker another sweep process started."""
    return HELPER_ENV in os.environ


def _end_with_parent() -> None:
    """In a started worker (Linux): SIGTERM when the worker that started it dies, so
    a killed sweep leaves no worker behind."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: such a worker ends with its trial's stage instead


class Helpers:
    """`count` more local workers: this command again, each with its own output folder
    under the sweep's and a log file there, in a session of their own (a Ctrl-C
    reaches this worker, which stops them). A context: a normal end waits for them; an
    error or interruption stops them (SIGTERM ends a worker's trial as interrupted: a
    resume runs it again) and kills any still running after STOP_SECONDS."""

    def __init__(self, count: int, sweep_dir: Path, overrides: list[str]):
        self.count, self.sweep_dir, self.overrides = count, sweep_dir, overrides
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def __enter__(self):
        from hydra.core.override_parser.types import Transformer

        cmd = command() if self.count else []
        for i in range(1, self.count + 1):
            folder = self.sweep_dir / f"worker{i}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "worker.log"
            with open(path, "w") as out:
                proc = subprocess.Popen(
                    [*cmd, *self.overrides, f"hydra.sweep.dir={Transformer.str(str(folder))}"],
                    env={**os.environ, HELPER_ENV: str(i), "PYTHONUNBUFFERED": "1"},
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_end_with_parent if sys.platform == "linux" else None)
            self.procs.append((proc, path))
            log.info("worker %d started (pid %d), log %s", i, proc.pid, path)
        return self

    def __exit__(self, kind, error, trace):
        try:
            if kind is not None:
                for proc, _ in self.procs:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            for proc, path in self.procs:
                try:
                    code = proc.wait(timeout=STOP_SECONDS if kind is not None else None)
                except subprocess.TimeoutExpired:
                    continue  # killed below
                if code != 0 and kind is None:
                    log.warning("worker pid %d ended with exit status %d: see %s",
                                proc.pid, code, path)
        finally:  # also when a second Ctrl-C cuts the wait short
            for proc, _ in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return False

"""The tracking writer: a background process that does a training run's MLflow work.

MLflow takes ~2.7 s of CPU to import in every process. The training process starts
the writer (`mlplab.writer_process`) first thing (`start`), so that import runs
beside Hydra's start-up and the data loading, and then only sends small messages
down a pipe (`RemoteRun`); the writer runs them (`mlplab.recorder.RunRecorder`) in
order.

The training process waits for the writer before it trains. Measured on a 2-core
machine: a busy process at normal priority makes OpenBLAS's two threads, and so
training, ~3x slower; at the lowest priority (Linux's SCHED_IDLE, which the writer
takes) training keeps its speed but the writer gets next to no CPU, as the BLAS
threads leave none idle. Either way its start-up is best done before training. What
the writer still does while training runs (metric writes, a multirun trial's figure
and model) then never slows it. Errors come back at the next call or progress check
(`check`). A single run waits at its end, so the command ends with the run in the
store; a
trial of a multirun does not (`end(wait=False)`): the writer draws its figure while
Hydra sets up the next trial, whose wait before training covers the rest, and the
process waits for the writer when it exits (at most CLOSE_TIMEOUT; then the writer
finishes on its own). The writer ignores Ctrl-C and termination signals: the training
process ends its run KILLED, and if it dies without ending its run, the writer sees
the pipe close and ends it FAILED.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from mlplab.tracking import Timed

CLOSE_TIMEOUT = 60.0  # seconds an exiting process waits for the writer to finish


class TrackingError(RuntimeError):
    """A run could not be recorded in MLflow."""


class Writer:
    """The training process's end of the pipe to one writer process."""

    def __init__(self):
        command_r, command_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlplab.writer_process", str(command_r), str(reply_w)],
                # Same session on purpose: with the kernel's autogroup scheduling a new
                # session would get its own CPU share, whatever its priority.
                pass_fds=(command_r, reply_w), stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(command_w)
            os.close(reply_r)
            raise
        finally:  # the writer's ends
            os.close(command_r)
            os.close(reply_w)
        self.pid = os.getpid()
        self.broken = False  # a message was cut short: the pipe can't be trusted
        self._commands = Connection(command_w, readable=False)
        self._replies = Connection(reply_r, writable=False)
        self._received: dict[tuple[str, int], tuple[int, object]] = {}  # (order, value)
        self._order = itertools.count()
        self._unwaited: dict[int, str] = {}  # ended without waiting: key -> run id
        self._next_key = 0

    @property
    def runs(self) -> int:
        """How many runs this writer was given."""
        return self._next_key

    def new_key(self) -> int:
        self._next_key += 1
        return self._next_key - 1

    def send(self, key: int, method: str, *args, **kwargs) -> None:
        self._require_intact()
        # Ctrl-C waits until the message is whole: a message cut in two would break
        # every message after it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._commands.send((key, method, args, kwargs))
        except OSError as err:
            raise TrackingError(self._ended_message()) from err
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.take_replies(block=False)

    def error(self, key: int, forget: bool = False) -> str | None:
        """What went wrong with run `key`'s record, if anything."""
        entry = (self._received.pop if forget else self._received.get)(("error", key), None)
        return entry[1] if entry else None

    def wait(self, kind: str, key: int):
        """Block until the writer reports `kind` for run `key`; TrackingError if that
        run's record failed before (replies come in the order of the calls) or the
        writer is gone. "ended" always comes: the caller asks `error` after it."""
        failed = ("error", key) if kind != "ended" else None
        while (kind, key) not in self._received and failed not in self._received:
            self.take_replies(block=True)
        if failed in self._received and (
                (kind, key) not in self._received or
                self._received[failed][0] < self._received[(kind, key)][0]):
            self._received.pop((kind, key), None)
            raise TrackingError(self._received[failed][1])
        return self._received.pop((kind, key))[1]

    def end_unwaited(self, key: int, run_id: str) -> None:
        """Run `key` is about to be ended without waiting: drop its replies as they
        come, and report a failure of its record on stderr (its caller moves on)."""
        self._unwaited[key] = run_id
        for kind in ("opened", "synced", "error"):
            order_value = self._received.pop((kind, key), None)
            if kind == "error" and order_value:
                self._report(key, order_value[1])
        self.take_replies(block=False)

    def flush(self) -> None:
        """Wait until every run ended without waiting is in the store."""
        while self._unwaited:
            self.take_replies(block=True)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let the writer finish what it was sent (it exits at the end of the pipe);
        one that was never given a run is stopped at once."""
        if self.pid != os.getpid():  # a forked child exiting: the writer is not its own
            return
        if self.runs == 0:
            self.process.kill()
        self._commands.close()
        deadline = time.monotonic() + timeout
        with contextlib.suppress(EOFError, OSError):
            while self._replies.poll(max(0.0, deadline - time.monotonic())):
                self._keep(self._replies.recv())
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"mlplab: the tracking writer (pid {self.process.pid}) is still writing; "
                  "it finishes on its own", file=sys.stderr)

    def take_replies(self, block: bool = False) -> None:
        self._require_intact()
        try:
            if block:
                self._keep(self._replies.recv())
            while self._replies.poll(0):
                self._keep(self._replies.recv())
        except (EOFError, OSError) as err:
            raise TrackingError(self._ended_message()) from err
        except BaseException:  # e.g. Ctrl-C inside a reply: the rest may be misread
            self.broken = True
            raise

    def _require_intact(self) -> None:
        if self.broken:
            raise TrackingError("the pipe to the tracking writer was interrupted mid-"
                                "message; the writer ends this process's open runs FAILED")

    def _keep(self, reply: tuple[str, int, object]) -> None:
        kind, key, value = reply
        if key not in self._unwaited:
            self._received[(kind, key)] = (next(self._order), value)
        elif kind == "error":
            self._report(key, value)
        elif kind == "ended":
            del self._unwaited[key]

    def _report(self, key: int, message: str) -> None:
        print(f"mlplab: run {self._unwaited[key]} was not fully recorded: {message}",
              file=sys.stderr)

    def _ended_message(self) -> str:
        code = self.process.poll()
        state = "is not responding" if code is None else f"ended with exit code {code}"
        return f"the tracking writer process (pid {self.process.pid}) {state}"


_writer: Writer | None = None


def start() -> Writer:
    """This process's writer, started on first use (again if it has died or its pipe
    broke; a broken one ends its open runs FAILED when it sees the pipe close)."""
    global _writer
    if _writer is not None and _writer.pid == os.getpid() and _writer.broken:
        _writer.close(timeout=0)
        _writer = None
    if _writer is None or _writer.pid != os.getpid() or _writer.process.poll() is not None:
        _writer = Writer()
        atexit.register(_writer.close)
    return _writer


def flush() -> None:
    """Wait until this process's runs are all in the store (a sweeper reads them)."""
    if _writer is not None and _writer.pid == os.getpid():
        _writer.flush()


def stop_if_unused() -> None:
    """Stop a writer started early (train.py) that no run will use after all."""
    global _writer
    if _writer is not None and _writer.pid == os.getpid() and _writer.runs == 0:
        _writer.close()
        _writer = None


class RemoteRun(Timed):
    """A run recorded by the writer: calls return at once, `sync` and `end` wait.
    `seconds` adds up the time the training process spent on them."""

    def __init__(self, *, uri: str, experiment: str, run_name: str | None = None,
                 parent_run_id: str | None = None):
        self.writer = start()
        self.key = self.writer.new_key()
        self._run_id: str | None = None
        self._call("open", uri, experiment, run_name, parent_run_id, dict(os.environ),
                   os.getcwd())

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            with self.timed():
                self._run_id = self.writer.wait("opened", self.key)
        return self._run_id

    def log_params(self, params: dict[str, str]) -> None:
        self._call("log_params", params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags)

    def log_datasets(self, spec: dict) -> None:
        self._call("log_datasets", spec)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def log_outputs(self, folder: str, history: list[dict], title: str, image_shape,
                    class_names, examples=None) -> None:
        self._call("log_outputs", folder, history, title, image_shape, class_names, examples)

    def check(self) -> None:
        """Raise TrackingError if the run's record has failed (cheap: one poll)."""
        with self.timed():
            self.writer.take_replies()
        self._raise_if_failed()

    def sync(self) -> None:
        """Wait until everything sent so far is written."""
        self._call("sync")
        with self.timed():
            self.writer.wait("synced", self.key)

    def end(self, status: str, *, failure: str | None = None,
            metrics: dict[str, float] | None = None, step: int = 0,
            wait: bool = True) -> None:
        """Close the run with `status`. With `wait`, return once it is in the store
        and raise TrackingError if any part of its record failed."""
        with self.timed():
            if not wait:  # before sending: "ended" may come back at once
                self.writer.end_unwaited(self.key, self.run_id)
            self.writer.send(self.key, "end", status, failure=failure, metrics=metrics,
                             step=step)
            if not wait:
                return
            self.writer.wait("ended", self.key)
        self._raise_if_failed(forget=True)

    def _call(self, method: str, *args) -> None:
        with self.timed():
            self.writer.send(self.key, method, *args)
        self._raise_if_failed()

    def _raise_if_failed(self, forget: bool = False) -> None:
        error = self.writer.error(self.key, forget=forget)
        if error:
            raise TrackingError(error)

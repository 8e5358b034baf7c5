"""The tracking writer process: runs, in order, the calls a training process sends.

Started by `mlplab.writer` as `python -m mlplab.writer_process <commands fd> <replies
fd>`. It imports everything a run needs first (the training process waits for that
before it trains), then executes `mlplab.recorder.RunRecorder` calls per run and
replies "opened" (with the run id), "synced", "ended" or "error". When the training
process is gone (end of the pipe) it closes any run still open as FAILED.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from multiprocessing.connection import Connection

ORPHANED = "the training process ended without closing its run"
SUPERSEDED = "a later run started before this one was closed"
FAILED_TO = {"open": "could not open a run", "log_params": "could not log the params",
             "set_tags": "could not set the tags", "log_datasets": "could not log the datasets",
             "log_metrics": "could not log metrics",
             "log_outputs": "could not log the figures and the model",
             "end": "could not close the run"}


def _import_store():
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import mlplab.recorder  # noqa: F401


def _import_outputs():
    import io

    import mlplab.plots
    import mlplab.pyfunc_model  # noqa: F401

    # The first figure of a process costs ~0.1 s more (fonts, building the figure):
    # drawn here, that overlaps the data loading instead of ending the first run.
    point = {"step": 0, **{f"{s}_{k}": 0.0 for s in ("train", "val")
                           for k in ("cost", "loss", "acc")}}
    mlplab.plots.plot_curves([point], io.BytesIO())


def _scan_packages():
    # The map of installed distributions MLflow scans when it first logs a model
    # (~0.3 s). Private: if it moves, the scan simply happens at that first model.
    with contextlib.suppress(Exception):
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()


def serve(commands: Connection, replies: Connection) -> None:
    """Run the calls that arrive, in order, until the training process closes the pipe."""
    from mlplab.recorder import RunRecorder

    def reply(kind, key, value=None):
        with contextlib.suppress(OSError):  # the training process may be gone
            replies.send((kind, key, value))

    recorders: dict[int, RunRecorder] = {}
    failures: dict[int, str] = {}

    def close_failed(key, failure):
        if key in failures:
            failure = f"tracking failed: {failures[key]}"
        with contextlib.suppress(Exception):
            recorders.pop(key).end("FAILED", failure=failure)

    while True:
        try:
            key, method, args, kwargs = commands.recv()
        except EOFError:
            break
        except Exception as err:  # a message cut short: nothing after it can be trusted
            print(f"mlplab tracking writer: the pipe broke: {err}", file=sys.stderr)
            break
        if method == "sync":
            reply("synced", key)
            continue
        if method == "open":  # MLflow has one active run: close any left open
            for other in list(recorders):
                close_failed(other, SUPERSEDED)
        recorder = recorders.setdefault(key, RunRecorder())
        if key in failures:
            if method == "log_outputs":
                shutil.rmtree(args[0], ignore_errors=True)
            if method != "end":
                continue  # the record is broken: only closing it is still worth doing
            args, kwargs = ("FAILED",), {"failure": f"tracking failed: {failures[key]}"}
        try:
            value = getattr(recorder, method)(*args, **kwargs)
        except Exception as err:
            failures[key] = f"{FAILED_TO.get(method, method)}: {err}"
            reply("error", key, failures[key])
        else:
            if method == "open":
                reply("opened", key, value)
        if method == "end":
            recorders.pop(key, None)
            reply("ended", key)
    for key in list(recorders):
        close_failed(key, ORPHANED)


def lowest_priority() -> bool:
    """Run only on CPU time nobody else wants (Linux's SCHED_IDLE). Measured on 2
    cores: a busy process at normal priority, even at nice 19, makes training ~3x
    slower (OpenBLAS's two threads wait for the core it holds); at SCHED_IDLE training
    keeps its speed. (Only within one session: the kernel's autogroup gives every
    session its own share, so the writer is not started in a new one.)"""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return True
    except OSError:
        return False


def main(argv: list[str]) -> None:
    # Ctrl-C, a closed terminal or a group kill are for the training process: the
    # writer outlives it, closes its runs and exits when the pipe closes.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    lowest_priority()
    commands = Connection(int(argv[0]), writable=False)
    replies = Connection(int(argv[1]), readable=False)
    # Everything a run needs, first: the training process waits for this before it
    # trains (it overlaps Hydra's start-up and the data loading).
    _import_store()
    _import_outputs()
    _scan_packages()
    serve(commands, replies)
    with contextlib.suppress(Exception):  # only queued if the user enabled async logging
        import mlflow

        mlflow.flush_async_logging()
    # Every write above is committed. Skip the interpreter's teardown: with MLflow
    # loaded it took ~1 s (module cleanup, MLflow's telemetry thread), and the
    # training process waits for this exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

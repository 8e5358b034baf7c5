"""Delivery in the background: this process's courier thread, and `sync` for the
spools a process left behind (the store away when it ended; `mlplab-sync`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from mlplab.app.passwords import mask_password
from mlplab.app.spool import LOCK, OPS, SPOOL_DIR, NotYet, Spool, deliver, pending_ops

log = logging.getLogger(__name__)

MIN_DELAY, MAX_DELAY = 1.0, 30.0  # seconds between attempts while the store is away
BATCH_SECONDS = 2.0  # metrics that come within this long go to the store in one write
# MLflow's answers that no retry will change: such a record is set aside, not retried
# (not BAD_REQUEST: a server says so of a step repeated after a cut-off answer)
REFUSALS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE")
REJECTED = ".rejected"  # a set-aside spool's folder ends so; rejected.txt says why


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return mask_password(text.splitlines()[0] if text else repr(err))


def refused(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in REFUSALS


def set_aside(folder: Path, err: BaseException) -> Path:
    """Move a spool the store refused out of the way, with the reason beside it."""
    aside = folder.with_name(folder.name + REJECTED)
    folder.rename(aside)
    (aside / "rejected.txt").write_text(first_line(err) + "\n")
    log.warning("the MLflow store refused a run's record (%s); it is kept in %s",
                first_line(err), aside)
    return aside


class Courier:
    """This process's delivery thread: every spool it writes, in the order opened
    (a sweep's parent before its trials), each operation in the order written."""

    def __init__(self):
        self._spools: list[Spool] = []
        self._cond = threading.Condition()
        self._dirty = self._urgent = False
        self.failing: str | None = None  # the last attempt's error while the store is away
        self._thread: threading.Thread | None = None

    def add(self, spool: Spool) -> None:
        with self._cond:
            self._spools.append(spool)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mlplab-courier",
                                                daemon=True)
                self._thread.start()
        spool.on_write = lambda closing: self.poke(urgent=closing)
        self.poke()  # for what it wrote before

    def poke(self, urgent: bool = False) -> None:
        with self._cond:
            self._dirty = True
            self._urgent |= urgent
            self._cond.notify_all()

    def wait(self, spools: list[Spool], seconds: float, while_reachable: bool = False) -> int:
        """Wait until `spools` are delivered, at most `seconds` (`while_reachable`:
        no longer once an attempt failed); returns the operations still waiting."""
        deadline = time.monotonic() + seconds
        self.poke(urgent=True)
        with self._cond:
            while any(not s.done for s in spools) and time.monotonic() < deadline:
                if while_reachable and self.failing:
                    break
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        # a spool set aside is not delivered: its run ends as not recorded
        return sum(pending_ops(s.folder) for s in spools if not s.done or s.rejected)

    def folders(self) -> set[Path]:
        """The folders of the spools this process has yet to deliver."""
        with self._cond:
            return {s.folder for s in self._spools if not s.done}

    def wait_all(self, seconds: float) -> int:
        """`wait` for every spool this process has written."""
        with self._cond:
            spools = list(self._spools)
        return self.wait(spools, seconds)

    def _loop(self) -> None:
        delay = MIN_DELAY
        while True:
            with self._cond:
                while not self._dirty:
                    self._cond.wait()
                if not self._urgent:  # let a few metrics gather into one write
                    self._cond.wait_for(lambda: self._urgent, BATCH_SECONDS)
                self._dirty = self._urgent = False
                spools = [s for s in self._spools if not s.done]
            failed = self._round(spools)
            if failed and not self.failing:
                log.warning("the MLflow store cannot take this process's runs (%s); they "
                            "are kept on disk and sent when it can", failed)
            elif self.failing and not failed:
                log.warning("the MLflow store takes runs again")
            with self._cond:
                self.failing = failed
                self._spools = [s for s in self._spools if not s.done]
                self._cond.notify_all()
            if failed or any(not s.done and s.ended for s in spools):
                with self._cond:  # a run that ends meanwhile cuts the wait short
                    self._cond.wait_for(lambda: self._urgent,
                                        delay if failed else MIN_DELAY)
                delay = min(2 * delay, MAX_DELAY) if failed else MIN_DELAY
                self.poke()
            else:
                delay = MIN_DELAY

    def _round(self, spools: list[Spool]) -> str | None:
        """One pass over the spools; why delivery stopped, if it did: the store is
        away, or a run waits for its parent (the caller waits while_reachable no
        longer either way)."""
        waiting = None
        for spool in spools:
            try:
                state = deliver(spool.folder, spool.uri)
            except NotYet as err:
                waiting = str(err)
                continue
            except Exception as err:
                if not refused(err):  # the store is away: try again later
                    return first_line(err)
                spool.release()
                spool.folder, spool.done = set_aside(spool.folder, err), True
                spool.rejected = True
                continue
            spool.run_id, spool.experiment_id = state["run_id"], state["experiment_id"]
            if state["ended"]:
                spool.done = True
                spool.release()
        return waiting


_courier: Courier | None = None
_courier_lock = threading.Lock()


def courier() -> Courier:
    global _courier
    with _courier_lock:
        if _courier is None:
            _courier = Courier()
        return _courier


def _forget_in_child() -> None:
    """A forked process (a launcher's worker) has no courier thread: it makes its own."""
    global _courier, _courier_lock
    _courier, _courier_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


# --- spools left behind -----------------------------------------------------------------

def find(folders: list[Path]) -> list[Path]:
    """The spool folders under `folders` (not those set aside as refused)."""
    return sorted({p.parent.resolve() for f in folders
                   for p in Path(f).glob(f"**/{SPOOL_DIR}/*/{OPS}")
                   if not p.parent.name.endswith(REJECTED)})


def sync(folders: list[Path], uri: str | None = None) -> tuple[int, int, list[str]]:
    """Deliver every spool under `folders` that no running process holds; parents
    before their children. Returns (runs delivered, runs left, messages)."""
    left = find(folders)
    delivered, messages = 0, []
    progress = True
    while left and progress:
        progress, waiting = False, []
        for folder in left:
            lock = FileLock(folder / LOCK, thread_local=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                messages.append(f"{folder}: written by a running process, left to it")
                continue
            try:
                if not (folder / OPS).exists():  # delivered meanwhile
                    continue
                state = deliver(folder, uri)
                if not state["ended"] and not pending_ops(folder):
                    # its process is gone (the lock was free) and all it wrote is in
                    messages.append(f"{folder}: its process ended without closing run "
                                    f"{state['run_id']}; it stays as the store shows it")
                    shutil.rmtree(folder, ignore_errors=True)
                delivered += 1
                progress = True
            except NotYet:
                waiting.append(folder)
            except Exception as err:
                if refused(err):
                    folder = set_aside(folder, err)
                messages.append(f"{folder}: {first_line(err)}")
            finally:
                lock.release()
        left = waiting
    messages += [f"{f}: its run, or its parent run, is not in the store yet" for f in left]
    return delivered, len(find(folders)), messages

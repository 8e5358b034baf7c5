"""Optuna storages as mlplab opens them, for the sweeper and for a trial reporting to
its pruner (mlplab.trial): in memory, a journal file, or a database whose every call
waits out an outage (a restart, a failover) instead of failing the search.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna

from mlplab.app.errors import ConfigError
from mlplab.app.passwords import mask_password, unmask
from mlplab.app.store import store_lock, with_retries

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal:"
SQLITE_TIMEOUT_SECONDS = 60  # how long SQLite waits for another worker's write lock
STORAGE_WAIT_SECONDS = 1800.0  # how long a call waits for a database that is away
MAX_RETRY_DELAY = 30.0  # ... trying again at least this often
OPEN_WAIT_SECONDS = 60.0  # ... but when it is first opened, this long at most


def open_storage(url: str | None, wait_seconds: float = STORAGE_WAIT_SECONDS,
                 max_delay: float = MAX_RETRY_DELAY) -> optuna.storages.BaseStorage:
    """None: in memory; journal:PATH: a journal file; anything else: an RDB URL (a
    password masked in the config is filled back in), whose calls wait through an
    outage of the database for up to `wait_seconds`, trying again at least every
    `max_delay` seconds (`Patient`)."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    if "://" not in url:
        raise ConfigError(f"hydra.sweeper.storage={url!r}: allowed null, journal:PATH, or a "
                          "database URL such as sqlite:///optuna.db or postgresql://...")
    url = unmask(url)
    # a database restarted under a live pool: each connection is checked before use
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_SECONDS}} \
        if url.startswith("sqlite") else {"pool_pre_ping": True}
    # several workers may create the schema at once: one at a time on a local file
    # (as MLflow's store), and "already exists" from a database server is retried
    with store_lock(url):
        # at start a refused connection is more often a wrong URL: a minute, not half an hour
        rdb = Patient.call(lambda: with_retries(
            lambda: optuna.storages.RDBStorage(url, engine_kwargs=kwargs)),
            min(wait_seconds, OPEN_WAIT_SECONDS), max_delay, "opening the storage")
    return Patient(rdb, wait_seconds, max_delay)


def _connection_lost(err: BaseException) -> BaseException | None:
    """The error in err's chain that says the database could not be reached (a refused
    or dropped connection, not a bad query), if any."""
    import sqlalchemy.exc

    while err is not None:
        if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.DisconnectionError)):
            return err
        err = err.__cause__ or err.__context__
    return None


class Patient(optuna.storages.BaseStorage):
    """An RDB storage whose every call waits out an outage of the database (a restart,
    a failover): retried with a back-off doubling from 1 s to `max_delay`, for up to
    `wait_seconds` in all, then the error is raised. `recovered_at` is when this
    process last saw the database come back: liveness is judged from then on, since
    nobody could write a heartbeat while it was away."""

    recovered_at = 0.0  # per process: time.time() of the last recovery

    def __init__(self, inner: optuna.storages.BaseStorage, wait_seconds: float,
                 max_delay: float):
        self.inner, self.wait_seconds, self.max_delay = inner, wait_seconds, max_delay

    @staticmethod
    def call(fn, wait_seconds: float, max_delay: float, what: str):
        deadline, delay, failed = time.monotonic() + wait_seconds, min(1.0, max_delay), False
        while True:
            try:
                result = fn()
            except Exception as err:
                lost = _connection_lost(err)
                if lost is None or time.monotonic() + delay > deadline:
                    raise
                if not failed:
                    reason = str(getattr(lost, "orig", None) or lost).strip().splitlines()
                    log.warning("the Optuna storage is unreachable (%s: %s); waiting up to "
                                "%.0f s for it", what, mask_password(reason[0][:200]),
                                wait_seconds)
                failed = True
                time.sleep(delay)
                delay = min(delay * 2, max_delay)
                continue
            if failed:
                Patient.recovered_at = time.time()
                log.warning("the Optuna storage is back (%s)", what)
            return result


def _patiently(name: str):
    def method(self, *args, **kwargs):
        return Patient.call(lambda: getattr(self.inner, name)(*args, **kwargs),
                            self.wait_seconds, self.max_delay, name)
    method.__name__ = name
    return method


for _name in [n for n in dir(optuna.storages.BaseStorage)
              if not n.startswith("_") and callable(getattr(optuna.storages.BaseStorage, n))]:
    setattr(Patient, _name, _patiently(_name))
Patient.__abstractmethods__ = frozenset()


def describe_storage(url: str | None) -> str:
    """The storage URL without a password, for logs and MLflow."""
    if url is None:
        return "in memory"
    if url.startswith(JOURNAL_PREFIX):
        return JOURNAL_PREFIX + str(Path(url[len(JOURNAL_PREFIX):]).expanduser().resolve())
    return mask_password(url)

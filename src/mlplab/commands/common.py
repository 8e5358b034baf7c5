"""What the commands share: where the configs are, how a command ends, what every
recorded run is tagged with."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mlplab.app import config, passwords, store, tracking

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # ships inside the package
PENDING_EXIT = 75  # EX_TEMPFAIL: the work is done, its record waits for the store
config.register()  # the schemas conf/ builds on, before any command composes it


def exit_with(message: str, code: int):
    """End a command with one line on stderr (no traceback) and an exit status."""
    print(f"mlplab: {message}", file=sys.stderr)
    sys.exit(code)


def hydra_overrides() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return " ".join(HydraConfig.get().overrides.task)
    except ValueError:  # composed without the command line (tests, notebooks)
        return None


def spool_root(uri: str) -> Path:
    """Where a run keeps its record until the store has it: Hydra's output folder of
    the run or job; without Hydra beside a local store, else the current folder."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        local = uri.startswith(store.SQLITE)
        return Path(uri[len(store.SQLITE):]).resolve().parent if local else Path.cwd()


def tracked_run(cfg: DictConfig, run_name: str, tags: dict | None = None):
    """tracking.run for this command's config: its record spooled in the output folder;
    at its end a single run waits up to tracking.wait_seconds for the store, a
    sweep's job only while the store answers (the sweep waits at its end)."""
    t = cfg.tracking
    uri = store.resolve_uri(t.uri)
    return tracking.run(
        uri=uri, experiment=t.experiment, spool_root=spool_root(uri),
        run_name=run_name, tags=tags, parent_run_id=t.parent_run_id,
        parent_spool_id=t.parent_spool_id, spool_id=t.spool_id,
        wait_seconds=t.wait_seconds, while_reachable=in_multirun())


def pending_line(pending: int, folder: Path, uri: str) -> str:
    """The one line a command ends with when the store is still away."""
    return (f"the MLflow store {passwords.mask_password(uri)} is unreachable: {pending} "
            f"records are kept in {folder}; deliver them with: mlplab-sync {folder}")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_tags(cfg: DictConfig, summary: str, data_fingerprint: str) -> dict[str, str | None]:
    """The tags every mlplab run carries: what ran, on which data and from which
    command line, plus the config's own `tags`."""
    return {"mlplab.summary": summary, "data_fingerprint": data_fingerprint,
            "hydra_overrides": hydra_overrides(), **cfg.tags}


class HidePasswords(Callback):
    """conf/config.yaml's `hydra.callbacks`: a password in a URL is masked in the config
    of a run or a multirun before Hydra saves it (see mlplab.app.passwords). A multirun's
    sweeper is made from the masked config, and its jobs composed from the masked
    overrides."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        passwords.hide_passwords(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        passwords.hide_passwords(config)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) ends the work like Ctrl-C: a run is closed
    KILLED, a sweep releases its running trials for a re-run at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

"""The Hydra plugin: `hydra/sweeper=mlplab_optuna`.

Hydra imports this module whenever it starts, so it stays light: the search itself
(Optuna, MLflow) lives in `_driver` and is imported only when a sweep runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .config import MlplabOptunaSweeperConf  # noqa: F401  (registers the config)

INTERRUPTED_WAIT_SECONDS = 10.0  # Ctrl-C: a short wait, not tracking.wait_seconds


class MlplabOptunaSweeper(Sweeper):
    """Staged Optuna search over Hydra overrides; its rules: `_rules`."""

    def __init__(self, **settings: Any) -> None:
        settings.pop("_target_", None)
        settings.pop("_recursive_", None)
        self.settings = OmegaConf.create(settings)  # keys as in config.MlplabOptunaSweeperConf
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        """Run the search. Like a single run, a bad config value or unusable data
        ends it with `mlplab: error: ...` and exit code 2; a stage with no complete
        trial, with exit code 1."""
        from mlplab.app import store
        from mlplab.app.config import ConfigError
        from mlplab.commands.common import PENDING_EXIT, exit_with, pending_line
        from mlplab.engine.data import DataError

        from ._driver import Sweep, SweepFailed

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        try:
            records = Sweep(self.settings, self.config, self.launcher,
                            self._compose).run(list(arguments))
        except (ConfigError, DataError) as err:
            self._deliver(sweep_dir)
            exit_with(f"error: {err}", 2)
        except SweepFailed as err:
            self._deliver(sweep_dir)
            exit_with(f"sweep FAILED: {err}", 1)
        except store.TrackingError as err:  # a URI MLflow cannot use, as a run says
            exit_with(f"tracking failed: {err}", 1)
        except KeyboardInterrupt:  # the parent's KILLED, if the store answers at once
            self._deliver(sweep_dir, INTERRUPTED_WAIT_SECONDS)
            raise
        pending = self._deliver(sweep_dir)
        if pending:
            exit_with(pending_line(pending, sweep_dir, store.resolve_uri(
                OmegaConf.select(self.config, "tracking.uri"))), PENDING_EXIT)
        return records

    def _deliver(self, sweep_dir: Path, seconds: float | None = None) -> int:
        """Wait up to tracking.wait_seconds for the store to have every run this
        process wrote (the trials' and the parent's); the records still waiting, with
        those other processes (a launcher's jobs, helpers) left in the sweep's folder."""
        from mlplab.app import courier, spool
        from mlplab.app.config import TrackingConfig

        if seconds is None:
            seconds = OmegaConf.select(self.config, "tracking.wait_seconds",
                                       default=TrackingConfig.wait_seconds)
        mine = courier.courier()
        pending = mine.wait_all(seconds)
        return pending + sum(spool.pending_ops(f) for f in courier.find([sweep_dir])
                             if f not in mine.folders())

    def _compose(self, overrides: list[str]) -> DictConfig:
        """The config of the job these overrides launch, as the launcher composes it."""
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                  list(overrides))


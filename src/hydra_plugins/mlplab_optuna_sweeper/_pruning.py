"""Pruners from `hydra.sweeper.pruner`: a name with its knobs in `hydra.sweeper.pruning`,
or, as the upstream Hydra Optuna sweeper takes it, `_target_` and the pruner's own
arguments (`{_target_: optuna.pruners.MedianPruner, n_startup_trials: 3}`).

The sweeper owns every trial's state; a job only reports (mlplab.trial), and the pruner
the sweeper stored on the study says whether to stop.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from mlplab.app.config import ConfigError, keyed
from mlplab.engine.checks import non_negative_int, positive_int, require
from mlplab.trial import make_pruner

from .config import PruningConf

log = logging.getLogger(__name__)

KEY = "hydra.sweeper.pruner"
PRUNERS = ("none", "median", "successive_halving", "hyperband")
CLASSES = {"NopPruner": "none", "MedianPruner": "median",
           "SuccessiveHalvingPruner": "successive_halving", "HyperbandPruner": "hyperband"}
# the knobs each named pruner takes from hydra.sweeper.pruning
KNOBS = {"none": (), "median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
         "successive_halving": ("min_resource", "reduction_factor"),
         "hyperband": ("min_resource", "max_resource", "reduction_factor")}
AUTO = "auto"


def describe(setting: Any, pruning) -> dict[str, Any]:
    """{"name": ..., knob: value} or {"_target_": ..., argument: value}: what the study
    stores, a resume compares and a job rebuilds its pruner from (checked here)."""
    if isinstance(setting, str):
        if setting not in PRUNERS:
            raise ConfigError(f"{KEY}={setting!r}: allowed {list(PRUNERS)}, or _target_ and "
                              "arguments, e.g. {_target_: optuna.pruners.MedianPruner}", key=KEY)
        knobs = {k: pruning[k] for k in KNOBS[setting]}
        with keyed("hydra.sweeper.pruning."):
            for key, value in knobs.items():
                _check_knob(key, value)
        out = {"name": setting, **knobs}
    elif isinstance(setting, (dict, DictConfig)):
        out = OmegaConf.to_container(setting, resolve=True) \
            if isinstance(setting, DictConfig) else dict(setting)
        if "_target_" not in out:
            raise ConfigError(f"{KEY}={out}: give _target_, e.g. optuna.pruners.MedianPruner",
                              key=f"{KEY}._target_")
        ignored = [k for k, v in (pruning or {}).items() if getattr(PruningConf, k) != v]
        if ignored:
            log.warning("%s is given with _target_: its own arguments apply, not "
                        "hydra.sweeper.pruning's %s", KEY, ignored)
    else:
        raise ConfigError(f"{KEY}={setting!r}: allowed {list(PRUNERS)}, or _target_ and "
                          "arguments", key=KEY)
    try:
        pruner = make_pruner(out)
    except Exception as err:
        text = str(err.__cause__ or err).splitlines()[-1]
        bad = re.search(r"unexpected keyword argument '(\w+)'", text)
        key = f"{KEY}.{bad.group(1)}" if bad else KEY
        raise ConfigError(f"{key}: {text}", key=key) from None
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ConfigError(f"{KEY}._target_={out['_target_']!r}: not an Optuna pruner",
                          key=f"{KEY}._target_")
    return out


def _check_knob(key: str, value) -> None:
    """A knob of hydra.sweeper.pruning, with the engine's checks (keyed by `describe`)."""
    if key.endswith("_resource"):
        require(value == AUTO or (isinstance(value, int) and value >= 1), key, value,
                f"allowed {AUTO!r} or an int >= 1 (update steps)")
    elif key == "reduction_factor":
        require(isinstance(value, int) and value >= 2, key, value, "allowed an int >= 2")
    elif key == "interval_steps":
        positive_int(key, value)
    else:
        non_negative_int(key, value)


def kind(settings: dict[str, Any]) -> str:
    """none, median, successive_halving, hyperband, or another pruner's class name."""
    if "name" in settings:
        return settings["name"]
    name = settings["_target_"].rsplit(".", 1)[-1]
    return CLASSES.get(name, name)


def prunes(settings: dict[str, Any]) -> bool:
    return kind(settings) != "none"


def bracket_share(settings: dict[str, Any]) -> float:
    """The smallest share of a stage's trials one sampler sees: Optuna gives a sampler
    only its own Hyperband bracket's trials (1.0 for other pruners, and for Hyperband
    before its resources are known)."""
    if kind(settings) != "hyperband":
        return 1.0
    defaults = {k: p.default for k, p in
                inspect.signature(optuna.pruners.HyperbandPruner).parameters.items()}
    knobs = {**defaults, **settings}
    low, high, rf = knobs["min_resource"], knobs["max_resource"], knobs["reduction_factor"]
    if AUTO in (low, high):
        return 1.0
    # Optuna's HyperbandPruner: floor(log_rf(max / min)) + 1 brackets, bracket s (from
    # the most aggressive) taking ceil(n * rf**s / (s + 1)) parts of the trials
    n = math.floor(math.log(high / low, rf)) + 1
    budgets = [math.ceil(n * rf ** s / (s + 1)) for s in range(n)]
    return min(budgets) / sum(budgets)

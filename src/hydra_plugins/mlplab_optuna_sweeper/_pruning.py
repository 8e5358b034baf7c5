"""Pruning: Optuna's pruners by name and their settings.

The sweeper owns every trial's state (it asks, and tells COMPLETE, FAIL or PRUNED).
A job it launches with `trial.study` set only reports (mlplab.trial): after each
evaluation point its objective goes to its trial in the shared storage (step = update
step), and the pruner the sweeper stored on the study says whether to stop.
"""

from __future__ import annotations

import math
from typing import Any

from mlplab.app.config import ConfigError

PRUNERS = ("none", "median", "successive_halving", "hyperband")
# the knobs each pruner takes from hydra.sweeper.pruning
KNOBS = {"none": (), "median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
         "successive_halving": ("min_resource", "reduction_factor"),
         "hyperband": ("min_resource", "max_resource", "reduction_factor")}
AUTO = "auto"


def describe(name: str, pruning) -> dict[str, Any]:
    """{"name": ..., knob: value}: what the study stores and a resume compares."""
    if name not in PRUNERS:
        raise ConfigError(f"hydra.sweeper.pruner={name!r}: allowed {list(PRUNERS)}",
                          key="hydra.sweeper.pruner")
    knobs = {k: pruning[k] for k in KNOBS[name]}
    for key, value in knobs.items():
        if key.endswith("_resource"):
            ok = value == AUTO or (isinstance(value, int) and value >= 1)
            allowed = f"{AUTO!r} or an int >= 1 (update steps)"
        elif key == "reduction_factor":
            ok, allowed = isinstance(value, int) and value >= 2, "an int >= 2"
        else:
            ok = isinstance(value, int) and value >= (1 if key == "interval_steps" else 0)
            allowed = "an int >= 1" if key == "interval_steps" else "an int >= 0"
        if not ok:
            raise ConfigError(f"hydra.sweeper.pruning.{key}={value!r}: allowed {allowed}",
                              key=f"hydra.sweeper.pruning.{key}")
    return {"name": name, **knobs}


def bracket_share(settings: dict[str, Any]) -> float:
    """The smallest share of a stage's trials one sampler sees: Optuna gives a sampler
    only its own Hyperband bracket's trials (1.0 for other pruners, and for Hyperband
    before its resources are known)."""
    if settings["name"] != "hyperband" or AUTO in (settings["min_resource"],
                                                  settings["max_resource"]):
        return 1.0
    # Optuna's HyperbandPruner: floor(log_rf(max / min)) + 1 brackets, bracket s (from
    # the most aggressive) taking ceil(n * rf**s / (s + 1)) parts of the trials
    rf = settings["reduction_factor"]
    n = math.floor(math.log(settings["max_resource"] / settings["min_resource"], rf)) + 1
    budgets = [math.ceil(n * rf ** s / (s + 1)) for s in range(n)]
    return min(budgets) / sum(budgets)



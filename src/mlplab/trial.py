"""The seam between a Hydra app and mlplab's sweeper (`hydra/sweeper=mlplab_optuna`):
what a job returns, and how a job reports to its trial's pruner. Neither side imports
the other; both import this.

A job (one trial: the app's task function) returns
- a number, the value of the sweep's objective (with several objectives, a list of
  numbers in the order of `hydra.sweeper.objectives`), as for Hydra's Optuna sweeper;
- or an `Outcome`: its final values by name, of which the sweeper takes the
  objectives (`hydra.sweeper.objectives`, default [val_acc]), and whether the job was
  pruned or failed (a failed trial is recorded FAIL and the sweep goes on).

Pruning needs an app whose config has a `trial` section (`storage`, `study`, `number`,
all null by default, as `TrialConfig`): the sweeper fills it in for a search that
prunes, and the job reports its objective at each evaluation step to
`reporter(cfg.trial)`, which says when to stop; the job then returns an Outcome with
`pruned_at`. A sweep with a pruner refuses an app without the section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

PRUNER_ATTR = "pruner"  # a stage study's user attribute: the pruner's settings


@dataclass
class TrialConfig:
    """Set by the sweeper on the jobs of a search that prunes: where the job reports
    (the Optuna storage, study and trial number)."""

    storage: str | None = None
    study: str | None = None
    number: int | None = None


@dataclass
class Outcome:
    """What a job ended with: `final` values by name (the objectives among them),
    the step its pruner stopped it at, or why it failed."""

    final: dict[str, float]
    pruned_at: int | None = None
    failure: str | None = None

    @classmethod
    def failed(cls, failure: str) -> Outcome:
        return cls({}, failure=failure)


def read_outcome(returned: Any, objectives: list[str]) -> Outcome:
    """A job's return value as an Outcome; ValueError naming what came back when it is
    none of a number, a list of numbers (one per objective) or an Outcome."""
    if isinstance(returned, Outcome):
        return returned
    values = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    if not values or not all(_number(v) for v in values):
        raise ValueError(f"the task returned {returned!r}: allowed a number, a list of "
                         "numbers (one per objective) or an mlplab.trial.Outcome")
    if len(values) != len(objectives):
        raise ValueError(f"the task returned {len(values)} values for the objectives "
                         f"{objectives}: allowed one per objective")
    return Outcome(dict(zip(objectives, map(float, values), strict=True)))


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)  # NumPy's scalars too


def make_pruner(settings: dict[str, Any]):
    """The Optuna pruner of stored settings: {"_target_": class, **its arguments}, built
    with Hydra's instantiate, or {"name": ..., **its arguments}."""
    import optuna

    if "_target_" in settings:
        from hydra.utils import instantiate

        return instantiate(settings)
    knobs = {k: v for k, v in settings.items() if k != "name"}
    return {"none": optuna.pruners.NopPruner,
            "median": optuna.pruners.MedianPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "hyperband": optuna.pruners.HyperbandPruner}[settings["name"]](**knobs)


def reporter(trial: TrialConfig | Any) -> Callable[[float, int], bool] | None:
    """For a job of a sweep that prunes (`trial.study` set): `report(value, step)`,
    which reports the objective at an update step to the job's trial and returns True
    when the pruner stops it; else None. The pruner is the one the sweeper stored on the
    study: every worker's pruner sees every trial's curve, a resumed sweep's too."""
    if trial is None or trial.study is None:
        return None
    import optuna

    from mlplab.app.optuna_storage import open_storage

    storage = open_storage(trial.storage)
    study = optuna.load_study(study_name=trial.study, storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    pruner = make_pruner(study.user_attrs.get(PRUNER_ATTR, {"name": "none"}))
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(trial.study), trial.number)

    reported: set[int] = set()

    def report(value: float, step: int) -> bool:  # as Trial.report and should_prune
        if int(step) not in reported:  # a step reported again keeps its first value
            reported.add(int(step))
            storage.set_trial_intermediate_value(trial_id, int(step), float(value))
        return pruner.prune(study, storage.get_trial(trial_id))

    return report

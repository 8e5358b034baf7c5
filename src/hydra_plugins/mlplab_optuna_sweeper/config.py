"""The sweeper's config schema, registered as `hydra/sweeper=mlplab_optuna`.

Every key can be set from the command line (`hydra.sweeper.n_trials=30`) or from a
search file under conf/search/.
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module before
# it is in sys.modules, where dataclasses would look string annotations up
from dataclasses import dataclass, field
from typing import Any  # noqa: UP035 (OmegaConf reads these)

from hydra.core.config_store import ConfigStore


@dataclass
class StageConf:
    n_trials: int | None = None  # null: the sweeper's n_trials
    overrides: list[str] = field(default_factory=list)  # e.g. [schedule.cycles=4]


@dataclass
class FinalConf:
    """The final step: retrain the last stage's best top_m, `seeds` seeds each."""

    overrides: list[str] = field(default_factory=list)
    top_m: int = 1  # candidates: the last stage's best top_m
    seeds: int = 1  # retrains of each, seeds seed_key, +1, ...
    choose_in: str = "final"  # final | last_stage: compare the top_m there, new seeds
    front_tolerance: float = 0.0  # several objectives: the pick's slack on the first
    seed_key: str = "train.seed"  # the app's key that seeds a job


@dataclass
class PruningConf:
    """Knobs of Optuna's pruners; steps are update steps; auto: from the first trial."""

    n_startup_trials: int = 5  # median
    n_warmup_steps: int = 0  # median
    interval_steps: int = 1  # median
    min_resource: Any = "auto"  # successive_halving, hyperband
    max_resource: Any = "auto"  # hyperband
    reduction_factor: int = 3  # successive_halving, hyperband


@dataclass
class MlplabOptunaSweeperConf:
    """docs/searching.md says what each key does."""

    _target_: str = "hydra_plugins.mlplab_optuna_sweeper.sweeper.MlplabOptunaSweeper"
    _recursive_: bool = False  # the sampler's _target_ is built per trial, with its seed
    direction: Any = "maximize"  # or a list, one per objective
    objectives: list[str] | None = None  # names in the task's outcome; null: [val_acc]
    sampler: Any = "tpe"  # a name, or _target_ and the sampler's arguments
    seed: int | None = None  # the samplers' seed (one per trial); null: a fresh one each run
    n_trials: int = 20  # a stage's trials, unless the stage says
    n_jobs: int = 1  # trials per launcher batch
    workers: int | None = None  # trials at once on this machine; null: one per core
    storage: str | None = None  # null: in memory (a journal if workers or a pruner share)
    study_name: str | None = None  # null: a new name each run (no resume)
    params: dict[str, Any] = field(default_factory=dict)  # Hydra's sweep syntax
    stages: list[StageConf] = field(default_factory=list)  # []: one stage of n_trials
    warm_start: list[Any] = field(default_factory=list)  # points, or {study, storage, top}
    carry_forward: bool = True  # a later stage's model learns from alike earlier trials
    top_k: int = 3  # the next stage spans the best top_k's log range ...
    margin: float = 0.0  # ... widened by this many decades each side
    final: FinalConf | None = None
    pruner: Any = "none"  # none | median | successive_halving | hyperband, or _target_
    pruning: PruningConf = field(default_factory=PruningConf)
    heartbeat_seconds: float = 10.0  # how often a worker marks its running trials alive
    stale_seconds: float = 60.0  # a running trial silent this long was interrupted
    storage_wait_seconds: float = 1800.0  # how long a database may be away


ConfigStore.instance().store(group="hydra/sweeper", name="mlplab_optuna",
                             node=MlplabOptunaSweeperConf, provider="mlplab")

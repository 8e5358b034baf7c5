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
    n_trials: int | None = None  # trials in this stage; null: the sweeper's n_trials
    overrides: list[str] = field(default_factory=list)  # extra overrides, e.g. schedule.cycles=4


@dataclass
class FinalConf:
    overrides: list[str] = field(default_factory=list)  # e.g. data.n_val=1000 schedule.cycles=3
    # Robust selection: retrain the best top_m trials of the last stage with `seeds`
    # seeds each (train.seed, train.seed+1, ...) and keep the best mean validation
    # accuracy. 1 and 1: retrain the best trial once (the reports' protocol).
    top_m: int = 1
    seeds: int = 1
    # where the top_m candidates are compared: final (their retrains above are the
    # answer) | last_stage (in the last stage's setting, e.g. its larger validation
    # split, with `seeds` new seeds each; then only the winner retrains with the final
    # overrides, `seeds` seeds, for final_test_acc)
    choose_in: str = "final"
    # several objectives: the front member retrained is the best in the second objective
    # among those within this much of the front's best first objective (0: the best
    # first objective); e.g. 0.005 with [val_acc, n_params]: the smallest net within
    # half a point of the most accurate
    front_tolerance: float = 0.0


@dataclass
class PruningConf:
    """Knobs of hydra.sweeper.pruner (Optuna's pruners); steps are update steps."""

    n_startup_trials: int = 5  # median: trials run to the end before any is pruned
    n_warmup_steps: int = 0  # median: no pruning before this step
    interval_steps: int = 1  # median: look every this many reported steps
    # successive_halving, hyperband: rungs at min_resource * reduction_factor**k steps,
    # keeping the best 1/reduction_factor of the trials at each; auto: from the first
    min_resource: Any = "auto"  # ... trial's steps (successive_halving, hyperband)
    max_resource: Any = "auto"  # hyperband: a full trial's steps; auto: the first one's
    reduction_factor: int = 3


@dataclass
class MlplabOptunaSweeperConf:
    _target_: str = "hydra_plugins.mlplab_optuna_sweeper.sweeper.MlplabOptunaSweeper"
    _recursive_: bool = False  # the sampler's _target_ is built per trial, with its seed
    # maximize | minimize the objective, or a list: one per objective, e.g. [maximize,
    # minimize] with objectives [val_acc, n_params] (a Pareto front; no pruner)
    direction: Any = "maximize"
    # what a trial's outcome is scored by: names in the task's final metrics (mlplab's:
    # val_acc, test_acc, train_acc, n_params, ...); null: val_acc
    objectives: list[str] | None = None
    # tpe | random | qmc | gp | cmaes | nsga2 (optuna.samplers), or _target_ and the sampler's
    # arguments: {_target_: optuna.samplers.TPESampler, n_startup_trials: 4}; the seed is
    # hydra.sweeper.seed's. A stage too short for the start-up: a third of its trials
    sampler: Any = "tpe"
    seed: int | None = None  # sampler seed; null: a fresh one each run
    n_trials: int = 20  # trials of a one-stage search, or of stages that don't say
    n_jobs: int = 1  # trials per launcher batch (run in parallel by e.g. joblib)
    # trials at once on this machine, each in a worker process of its own taking the
    # next trial as soon as it is free; null: one per core (Hydra's basic launcher),
    # 1 with a launcher that runs batches itself. BLAS threads per trial: the cores
    # shared among the trials that run at once (train.threads, if given, wins)
    workers: int | None = None
    # null: in memory (no resume; with a pruner or several workers, a journal file in
    # the sweep's folder, which the jobs and workers share); sqlite:///optuna.db,
    # postgresql://...: a database; journal:PATH: Optuna's journal file (safe for
    # several local workers)
    storage: str | None = None
    study_name: str | None = None  # null: a new name each run (no resume)
    # the search space, Hydra's sweep syntax: lam: tag(log, interval(1e-5, 1e-1))
    params: dict[str, Any] = field(default_factory=dict)
    stages: list[StageConf] = field(default_factory=list)  # []: one stage of n_trials
    # points stage 0 runs first (its budget counts them), e.g. [{lam: 0.004}]: a value
    # per searched key; or {study: NAME, storage: URL (null: this one), top: 3}: the best
    # complete trials of another study that lie in this space. Once per study, so a
    # resume does not run them again
    warm_start: list[Any] = field(default_factory=list)
    # a later stage's model-based sampler also learns from the earlier stages' complete
    # trials in its space, when they trained alike (same stage overrides); they inform,
    # they are not counted nor run again
    carry_forward: bool = True
    top_k: int = 3  # the next stage searches the log range spanned by the best top_k
    margin: float = 0.0  # ... widened by this many decades on each side
    final: FinalConf | None = None  # retrain the best trial(s) with these overrides
    # stop hopeless trials early: none | median | successive_halving | hyperband; each
    # trial reports its validation accuracy at every evaluation point (not the final)
    pruner: str = "none"
    pruning: PruningConf = field(default_factory=PruningConf)
    heartbeat_seconds: float = 10.0  # how often a worker marks its running trials alive
    stale_seconds: float = 60.0  # a running trial silent this long was interrupted
    # a database storage that is away (restarted, failing over): each call retries
    # with a back-off of 1 s to 30 s for this long before the worker gives up; liveness
    # is judged again from its return, so no live trial looks stale
    storage_wait_seconds: float = 1800.0


ConfigStore.instance().store(group="hydra/sweeper", name="mlplab_optuna",
                             node=MlplabOptunaSweeperConf, provider="mlplab")

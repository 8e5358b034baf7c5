"""hydra.sweeper settings: checked before anything runs (a ConfigError naming the key,
as the app's own checks do), and what a resumed study must share with its start."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mlplab.app import optuna_storage
from mlplab.app.config import Config as MlplabConfig
from mlplab.app.config import ConfigError, keyed
from mlplab.app.experiment import validate as validate_config
from mlplab.engine.checks import non_negative, positive, positive_int, require

from . import _pruning, _rules, _samplers, _space, _studies
from ._rules import Stage
from ._space import Param

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
CHOOSE_IN = ("final", "last_stage")  # where the final step compares its candidates
VAL_ACC = "val_acc"  # the default objective
SETTINGS = "settings"  # the sweep study's user attribute: the search a resume must match


def plan(s: DictConfig) -> list[Stage]:
    """The stages the settings describe, the final retrain (if any) last."""
    with keyed("hydra.sweeper."):
        return _rules.plan(s.n_trials, OmegaConf.to_container(s.stages, resolve=True),
                           None if s.final is None
                           else OmegaConf.to_container(s.final, resolve=True))


def check(s: DictConfig) -> tuple[dict, dict]:
    """Every hydra.sweeper setting checkable before anything runs (ConfigError naming
    the key, as the app's own checks do); the sampler's and the pruner's settings, each
    described once (`_samplers.spec`, `_pruning.describe`)."""
    sampler, pruner = _samplers.spec(s.sampler), _pruning.describe(s.pruner, s.pruning)
    with keyed("hydra.sweeper."):
        _check(s, sampler, _pruning.prunes(pruner))
    _samplers.make(sampler, 0)  # bad arguments, packages: now
    return sampler, pruner


def _check(s: DictConfig, sampler: dict, prunes: bool) -> None:
    directions, names, final = as_directions(s.direction), objectives(s), s.final
    require(len(names) == len(directions), "objectives", names,
            f"one per direction ({len(directions)}: {directions})")
    # the jobs report their validation accuracy to the pruner, whatever is optimised
    # (several objectives: refused below, with Optuna's reason)
    require(not prunes or names == [VAL_ACC] or len(names) > 1, "pruner", s.pruner,
            f"with objectives={names} a trial reports its val_acc to the pruner, so a "
            "pruner needs objectives [val_acc]; allowed none")
    if final is not None:
        non_negative("final.front_tolerance", final.front_tolerance)
        positive_int("final.top_m", final.top_m)
        positive_int("final.seeds", final.seeds)
        require(final.choose_in in CHOOSE_IN, "final.choose_in", final.choose_in,
                f"allowed {list(CHOOSE_IN)}")
    if len(directions) > 1:  # what Optuna and a single answer allow with a front
        require(not prunes, "pruner", s.pruner, "Optuna cannot prune a study of "
                f"several objectives (direction={directions}); allowed none")
        require(len(s.stages) <= 1, "stages", len(s.stages), "with several objectives a "
                "search has one stage (narrowing to the best has no single best); "
                "allowed 0 or 1")
        require(_samplers.handles_objectives(sampler, len(directions)), "sampler",
                _samplers.describe(sampler), "cannot search several objectives; allowed "
                "tpe, nsga2, random, qmc, gp")
        require(final is None or (final.top_m == 1 and final.choose_in == "final"),
                "final.top_m", final and final.top_m, "with several objectives the final "
                "step retrains the one front member final.front_tolerance picks; allowed "
                "top_m=1 and choose_in=final (seeds may be more)")
    positive_int("n_trials", s.n_trials)
    positive_int("n_jobs", s.n_jobs)
    require(s.workers is None or s.workers >= 1, "workers", s.workers,
            "allowed null (one per core) or an int >= 1")
    positive_int("top_k", s.top_k)
    non_negative("margin", s.margin)  # decades
    positive("heartbeat_seconds", s.heartbeat_seconds)
    non_negative("storage_wait_seconds", s.storage_wait_seconds)
    require(s.stale_seconds > s.heartbeat_seconds, "stale_seconds", s.stale_seconds,
            f"must exceed heartbeat_seconds={s.heartbeat_seconds}, or live trials would "
            "look stale")


def as_directions(direction) -> list[str]:
    """hydra.sweeper.direction as a list: one per objective."""
    out = [direction] if isinstance(direction, str) else \
        list(direction) if isinstance(direction, (list, ListConfig)) else None
    if not out or not all(d in DIRECTIONS for d in out):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: allowed {DIRECTIONS} or "
                          "a list of them, one per objective", key="hydra.sweeper.direction")
    return out


def objectives(s: DictConfig) -> list[str]:
    """The names of the outcome's metrics the trials are scored by (default val_acc)."""
    return list(s.objectives) if s.objectives is not None else [VAL_ACC]


WARM = "hydra.sweeper.warm_start"
FROM_STUDY = ("study", "storage", "top")  # a warm start from another study's best trials


def warm_entries(params: list[Param], given: list) -> list[dict]:
    """warm_start checked: each point in the space (a choice as the space stores it),
    or {study: NAME, storage: URL or null, top: N or null} with no other key."""
    out = []
    for i, entry in enumerate(given):
        if isinstance(entry, dict) and "study" in entry:
            extra = sorted(set(entry) - set(FROM_STUDY))
            if extra:
                raise ConfigError(f"{WARM}[{i}]: {extra} with 'study'; allowed keys "
                                  f"{list(FROM_STUDY)}", key=f"{WARM}[{i}]")
            top = entry.get("top")
            if top is not None and (not isinstance(top, int) or top < 1):
                raise ConfigError(f"{WARM}[{i}].top={top!r}: allowed null (all) or an int "
                                  ">= 1", key=f"{WARM}[{i}].top")
            out.append({k: entry.get(k) for k in FROM_STUDY})
        else:
            out += _space.warm_points(params, [entry], WARM, first=i)
    return out


def warm_points(params: list[Param], entries: list[dict], storage, n_trials: int) -> list[dict]:
    """The points stage 0 starts from: the given ones, and the best trials of the
    studies named, those that lie in this space (others are said and skipped)."""
    points = []
    for entry in entries:
        if set(entry) != set(FROM_STUDY):  # a point (warm_entries made study entries so)
            points.append(entry)
            continue
        other = storage if entry["storage"] is None \
            else optuna_storage.open_storage(entry["storage"])
        found = _studies.best_points(other, entry["study"], entry["top"])
        inside = [p for p in found if _space.inside(params, p)]
        log.info("warm start: %d of the %d best trials of study %s lie in this space",
                 len(inside), len(found), entry["study"])
        points += [_space.warm_points(params, [p], WARM)[0] for p in inside]
    if len(points) > n_trials:
        raise ConfigError(f"{WARM}: {len(points)} points for stage 0's {n_trials} trials; "
                          "allowed at most that many (a study's: set its top)", key=WARM)
    return points


def names_searched(err: Exception, params: list[Param]) -> bool:
    """Whether a ConfigError is about a searched key (that sample's fault)."""
    return getattr(err, "key", None) in {p.name for p in params}


def search_settings(s: DictConfig, params: list[Param], stages: list[Stage],
                    warm: list[dict], pruner: dict) -> dict:
    """What a resumed study must share with the run that started it (JSON for Optuna)."""
    directions = as_directions(s.direction)  # [maximize] is stored as maximize, as before
    return {"direction": directions[0] if len(directions) == 1 else directions,
            "objectives": objectives(s),
            "carry_forward": s.carry_forward,
            "space": {p.name: _space.describe(p) for p in params},
            "top_k": s.top_k, "margin": s.margin,
            "pruner": pruner,
            "warm_start": warm,
            "stages": [{"stage": st.label, "n_trials": st.n_trials,
                        "overrides": st.overrides} for st in stages]}


def check_jobs(config: DictConfig, compose, stages: list[Stage], params: list[Param],
           fixed: list[str]) -> None:
    """Compose each stage's first job at a point of the space and validate it as a
    single run would: a bad value stops the sweep before anything is recorded.
    Only mlplab's own config: another app's jobs say what is wrong themselves."""
    if OmegaConf.get_type(config) is not MlplabConfig:
        return
    point = _space.sample(params)
    for stage in stages:
        job = compose([*fixed, *stage.overrides,
                            *(p.override(point[p.name]) for p in params)])
        with open_dict(job):
            del job["hydra"]  # the task's own config, as Hydra hands it to the job
        try:
            validate_config(job)
        except ConfigError as err:
            if not names_searched(err, params):
                raise
            log.warning("stage %s: %s (at the point %s of the space): trials with "
                        "such values will fail", stage.label, err, point)

def check_resume(sweep_study, storage, name: str, url: str | None, wanted: dict) -> None:
    """Refuse to resume a study with another search (`_rules.resume_diffs`)."""
    stored = sweep_study.user_attrs.get(SETTINGS)
    if stored is None:  # a new study (or one from before settings were stored)
        sweep_study.set_user_attr(SETTINGS, wanted)
        return
    # from before pruning, warm starts existed
    stored = {"pruner": {"name": "none"}, "warm_start": [], "objectives": [VAL_ACC],
              "carry_forward": True, **stored}
    labels = {st["stage"] for st in wanted["stages"]} | {_rules.CHOOSE, _rules.FINAL}
    started = {label for label in labels
               if _studies.exists(storage, f"{name}.{_rules.study_suffix(label)}")}
    diffs = _rules.resume_diffs(stored, wanted, started)
    if diffs:
        raise ConfigError(
            f"hydra.sweeper.study_name={name!r}: this study in "
            f"{optuna_storage.describe_storage(url)} was started with another "
            f"search ({'; '.join(diffs)}), and resuming would mix the two. Re-run with "
            "its settings, or start a fresh search: hydra.sweeper.study_name=NEW_NAME")
    if stored != wanted:  # a grown budget: the next resume compares with it
        sweep_study.set_user_attr(SETTINGS, wanted)

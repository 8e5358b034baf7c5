"""Samplers from `hydra.sweeper.sampler`, and the start-up a stage leaves them.

The setting is a name (tpe, random, qmc, gp, cmaes) or, as the upstream Hydra Optuna
sweeper takes it, `_target_` and the sampler's own arguments, built with Hydra's
`instantiate`:

    sampler: {_target_: optuna.samplers.TPESampler, n_startup_trials: 4, multivariate: true}

The seed is the sweep's (`hydra.sweeper.seed`, one per trial: `_rules.trial_seed`).
A model-based sampler draws its first `n_startup_trials` at random; a stage with no more
trials than that would never use the model. So a stage gets the sampler's own start-up
when it leaves trials after it, else a third of its trials (said in the log); a
start-up the user set that covers the whole stage is refused before anything runs.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import re
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from mlplab.app.config import ConfigError

log = logging.getLogger(__name__)

KEY = "hydra.sweeper.sampler"
NAMES = {"tpe": "optuna.samplers.TPESampler", "random": "optuna.samplers.RandomSampler",
         "qmc": "optuna.samplers.QMCSampler", "gp": "optuna.samplers.GPSampler",
         "cmaes": "optuna.samplers.CmaEsSampler", "nsga2": "optuna.samplers.NSGAIISampler"}
BLIND = ("RandomSampler", "QMCSampler")  # samplers that draw without looking at trials
NEEDS = {"GPSampler": ("torch", "scipy"), "CmaEsSampler": ("cmaes",)}  # not optuna's deps
STARTUP = "n_startup_trials"
STARTUP_SHARE = 3  # a stage too short for a sampler's own start-up: a third of it


def spec(setting: Any) -> dict:
    """{"_target_": the sampler class, argument: value, ...} of a setting."""
    if isinstance(setting, str):
        if setting not in NAMES:
            raise ConfigError(f"{KEY}={setting!r}: allowed {sorted(NAMES)}, or _target_ "
                              "and arguments, e.g. {_target_: optuna.samplers.TPESampler, "
                              "n_startup_trials: 4}", key=KEY)
        return _check_packages({"_target_": NAMES[setting]})
    out = OmegaConf.to_container(setting) if isinstance(setting, DictConfig) else dict(setting)
    if "_target_" not in out:
        raise ConfigError(f"{KEY}={out}: give _target_, e.g. optuna.samplers.TPESampler, "
                          "and its arguments", key=f"{KEY}._target_")
    if "seed" in out:
        raise ConfigError(f"{KEY}.seed={out['seed']!r}: the sweep seeds each trial's sampler "
                          "from hydra.sweeper.seed; set that instead", key=f"{KEY}.seed")
    if not issubclass(_class(out), optuna.samplers.BaseSampler):
        raise ConfigError(f"{KEY}._target_={out['_target_']!r}: not an Optuna sampler",
                          key=f"{KEY}._target_")
    return _check_packages(out)


def _check_packages(out: dict) -> dict:
    """Refuse now a sampler whose packages are missing: it would fail once its
    start-up is over, in the middle of the search."""
    name = out["_target_"].rsplit(".", 1)[-1]
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{KEY}: {name} needs {missing}, not installed (pip install "
                          f"{' '.join(missing)}); allowed without them: tpe, random, qmc, "
                          "nsga2", key=KEY)
    return out


def _class(out: dict) -> type:
    from hydra.utils import get_class

    target = out.get("_target_")
    try:
        return get_class(target)
    except Exception:
        raise ConfigError(f"{KEY}._target_={target!r}: not a class that can be imported, "
                          "e.g. optuna.samplers.TPESampler", key=f"{KEY}._target_") from None


def make(sampler: dict, seed: int | None, n_startup: int | None = None):
    """The sampler `spec` describes, with this seed (and start-up, if it has one)."""
    from hydra.utils import instantiate

    extra = {} if n_startup is None else {STARTUP: n_startup}
    try:
        return instantiate(sampler, seed=seed, **extra)
    except Exception as err:
        text = str(err.__cause__ or err)
        bad = re.search(r"unexpected keyword argument '(\w+)'", text)
        key = f"{KEY}.{bad.group(1)}" if bad else KEY
        allowed = [p for p in inspect.signature(_class(sampler)).parameters if p != "seed"]
        raise ConfigError(f"{key}: {text.splitlines()[-1]}; {sampler['_target_']} takes "
                          f"{allowed}", key=key) from None


def startup(sampler: dict, n_trials: int, stage: str, share: float = 1.0) -> int | None:
    """The start-up of a stage of `n_trials` trials (None: the sampler has none), of
    which the sampler's model sees `share` (Hyperband: the smallest bracket's)."""
    param = inspect.signature(_class(sampler)).parameters.get(STARTUP)
    if param is None:
        return None
    seen = max(1, math.floor(n_trials * share))
    where = f"stage {stage} has n_trials={n_trials}" + (
        "" if seen == n_trials else f", about {seen} in Hyperband's smallest bracket "
        "(Optuna's sampler sees its bracket's trials only)")
    given = sampler.get(STARTUP)
    if given is not None:
        if given >= seen:
            raise ConfigError(
                f"{KEY}.{STARTUP}={given}: {where}, so all of them would be the sampler's "
                f"random start-up; allowed < {seen}", key=f"{KEY}.{STARTUP}")
        return given
    if param.default < seen:
        return param.default
    fit = max(1, seen // STARTUP_SHARE)
    log.info("%s, not more than %s's default %s=%d: its start-up is %d random trial(s), "
             "then its model (set %s.%s to choose)", where,
             sampler["_target_"].rsplit(".", 1)[-1], STARTUP, param.default, fit, KEY,
             STARTUP)
    return fit


def handles_objectives(sampler: dict, n: int) -> bool:
    """Whether the sampler can search `n` objectives (CMA-ES cannot search several):
    asked for one point of a throwaway study, as Optuna checks it."""
    if n == 1:
        return True
    study = optuna.create_study(directions=["maximize"] * n, sampler=make(sampler, 0))
    try:
        study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    except ValueError:
        return False
    return True


def learns(sampler: dict) -> bool:
    """Whether the sampler draws from what earlier trials scored (TPE, GP, ...)."""
    return sampler["_target_"].rsplit(".", 1)[-1] not in BLIND


def describe(sampler: dict) -> str:
    """'TPESampler(multivariate=True, n_startup_trials=4)', for the parent run."""
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(sampler.items()) if k != "_target_")
    return f"{sampler['_target_'].rsplit('.', 1)[-1]}({args})"

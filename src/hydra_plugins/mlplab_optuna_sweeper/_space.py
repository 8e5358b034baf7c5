"""The search space: Hydra's sweep syntax in, Optuna distributions and job overrides out.

    lam=tag(log, interval(1e-5, 1e-1))   -> FloatDistribution(1e-5, 0.1, log=True)
    x=interval(0, 1)                     -> FloatDistribution(0, 1)
    n=int(interval(8, 64))               -> IntDistribution(8, 64)   (int(tag(log, ...)): log)
    n=range(8, 64, 8)                    -> IntDistribution(8, 56, step=8) (range excludes 64)
    x=range(0.1, 1, 0.2)                 -> FloatDistribution(0.1, 0.9, step=0.2)
    opt=choice(a, b), opt=a,b, shuffle() -> CategoricalDistribution

Anything that is not a sweep is a fixed override passed to every job unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mlplab.app.config import ConfigError

from ._rules import is_log, is_numeric


@dataclass
class Param:
    """One swept key: `name` is the config key (lam), `key` what the override writes
    (lam, or +extra for a key the config lacks)."""

    name: str
    key: str
    distribution: BaseDistribution
    # override text of each categorical choice: choices are stored as Optuna-friendly
    # values (lists become their text), the job gets back exactly what the user wrote
    choice_texts: dict = field(default_factory=dict)

    def override(self, value) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            return f"{self.key}={self.choice_texts[value]}"
        return f"{self.key}={Transformer.str(value)}"

    @property
    def log(self) -> bool:
        return is_log(self.distribution)

    @property
    def numeric(self) -> bool:
        return is_numeric(self.distribution)


def parse(arguments: Sequence[str]) -> tuple[list[Param], list[str]]:
    """Split overrides into swept parameters and fixed overrides (kept as written).
    A later override of the same key replaces an earlier one, so the command line
    wins over the search file's `params`."""
    parsed = OverridesParser.create().parse_overrides(list(arguments))
    latest: dict[str, Override] = {}
    for override in parsed:
        latest.pop(override.key_or_group, None)  # re-inserted last: keeps the order
        latest[override.key_or_group] = override
    params, fixed = [], []
    for override in latest.values():
        if override.is_sweep_override():
            params.append(_param(override))
        else:
            fixed.append(override.input_line)
    return params, fixed


def _param(override: Override) -> Param:
    name, key, value = override.key_or_group, override.get_key_element(), override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        items = list(override.sweep_iterator(transformer=Transformer.identity))
        choices = [Transformer.encode(x) for x in items]
        texts = {c: Transformer.str(x) for c, x in zip(choices, items, strict=True)}
        return Param(name, key, CategoricalDistribution(choices), texts)
    if isinstance(value, RangeSweep):
        items = list(override.sweep_iterator(transformer=Transformer.identity))
        if not items:
            raise ConfigError(f"{override.input_line}: the range is empty")
        step = value.step
        if all(isinstance(x, int) for x in (value.start, value.stop, step)):
            return Param(name, key, IntDistribution(items[0], items[-1], step=step))
        return Param(name, key, FloatDistribution(items[0], items[-1], step=step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if log and value.start <= 0:
            raise ConfigError(f"{override.input_line}: a log interval must start above 0")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return Param(name, key, IntDistribution(value.start, value.end, log=log))
        return Param(name, key, FloatDistribution(value.start, value.end, log=log))
    assert not isinstance(value, ChoiceSweep)
    raise ConfigError(f"{override.input_line}: this sweep is not supported; use "
                      "interval(), tag(log, interval()), int(...), range() or choice()")


def suggest(trial, params: Iterable[Param]) -> dict:
    """Sample every parameter on an Optuna trial (public Trial API)."""
    for p in params:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(p.name, d.choices)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
        else:
            trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)
    return trial.params


def sample(params: Iterable[Param], seed: int = 0) -> dict:
    """One point of the space, drawn without touching any storage: what the sweep's
    config is checked with before it starts."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return study.ask({p.name: p.distribution for p in params}).params


def warm_points(params: Sequence[Param], points: Sequence[dict], key: str,
                first: int = 0) -> list[dict]:
    """Points given to start a search from, as trial params (a choice as the space
    stores it); ConfigError naming `key[i].<param>` for one that is not in the space
    (i counted from `first`)."""
    out = []
    names = [p.name for p in params]
    for i, given in enumerate(points, start=first):
        given = dict(given)
        if sorted(given) != sorted(names):
            raise ConfigError(f"{key}[{i}]={given}: give a value for each searched key, "
                              f"{names}, and no other", key=f"{key}[{i}]")
        point = {}
        for p in params:
            v, d = given[p.name], p.distribution
            if isinstance(d, CategoricalDistribution):
                v = Transformer.encode(v)
                ok, allowed = v in d.choices, f"one of {list(p.choice_texts.values())}"
            else:
                number = int if isinstance(d, IntDistribution) else (int, float)
                ok = isinstance(v, number) and not isinstance(v, bool) \
                    and d.low <= v <= d.high and on_grid(v, d)
                allowed = f"{'an int' if number is int else 'a number'} in {describe(p)}"
            if not ok:
                raise ConfigError(f"{key}[{i}].{p.name}={given[p.name]!r}: allowed {allowed}",
                                  key=f"{key}[{i}].{p.name}")
            point[p.name] = v
        out.append(point)
    return out


def on_grid(v, d) -> bool:
    """Whether v is low + k * step (always, without a step)."""
    if not d.step:
        return True
    k = (v - d.low) / d.step
    return abs(k - round(k)) < 1e-9


def inside(params: Sequence[Param], point: dict) -> bool:
    """Whether a trial's params (as a study stores them) are a point of this space."""
    try:
        warm_points(params, [point], "point")
    except ConfigError:
        return False
    return True


def pinned(params: Iterable[Param], values: dict) -> list[Param]:
    """The same parameters, each reduced to one value (the final retrain's)."""
    out = []
    for p in params:
        v, d = values[p.name], p.distribution
        if isinstance(d, CategoricalDistribution):
            single = CategoricalDistribution([v])
        elif isinstance(d, IntDistribution):
            single = IntDistribution(v, v, log=d.log)
        else:
            single = FloatDistribution(v, v, log=d.log)
        out.append(Param(p.name, p.key, single, p.choice_texts))
    return out


def seeded(params: Iterable[Param], values: dict, key: str, seed: int) -> list[Param]:
    """`pinned` to `values`, plus the seed key `key` pinned to `seed`: one retrain of the final
    step."""
    return [*pinned(params, values), Param(key, key, IntDistribution(seed, seed))]


def point(pinned_params: Iterable[Param]) -> dict:
    """The values a pinned space holds, as a trial's params."""
    return {p.name: p.distribution.choices[0]
            if isinstance(p.distribution, CategoricalDistribution) else p.distribution.low
            for p in pinned_params}


def describe(p: Param) -> str:
    """log[1e-05, 0.1], int[8, 64], step 0.2[0.1, 0.9], choice(a, b): for logs, MLflow."""
    d = p.distribution
    if isinstance(d, CategoricalDistribution):
        return "choice(" + ", ".join(map(str, d.choices)) + ")"
    kind = ["int"] if isinstance(d, IntDistribution) else []
    kind += ["log"] if p.log else ([f"step {d.step:g}"] if d.step not in (None, 1) else [])
    return f"{' '.join(kind)}[{d.low!r}, {d.high!r}]"

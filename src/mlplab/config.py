"""The config schema: what `conf/` may contain and which values are allowed.

OmegaConf enforces types and refuses unknown keys while Hydra composes; `validate`
then checks the values (ranges, orderings, names) before anything is trained or
tracked, and names the key and what is allowed in its message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mlplab.data import CIFAR10_MD5, CIFAR10_URL, DATASETS, SPLITS
from mlplab.network import INITS

DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "clr")


class ConfigError(ValueError):
    """A config value outside what is allowed; `key` names it (None: several keys)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class DataConfig:
    name: str = "cifar10"
    url: str = CIFAR10_URL
    md5: str = CIFAR10_MD5
    root: str | None = None  # None: $MLPLAB_DATA, else ~/.cache/mlplab
    split: str = "batch1"
    n_val: int = 5000
    n_train: int | None = None


@dataclass
class ModelConfig:
    layers: list[int] = field(default_factory=lambda: [50])
    init: str = "he"
    init_std: float = 1e-2
    bn_momentum: float = 0.9


@dataclass
class ConstantSchedule:
    name: str = "constant"
    eta: float = 1e-3
    epochs: int = 40


@dataclass
class CyclicalSchedule:
    name: str = "clr"
    eta_min: float = 1e-5
    eta_max: float = 1e-1
    n_s: int | None = 500
    n_s_k: float | None = None
    cycles: int = 1


@dataclass
class TrainConfig:
    batch_size: int = 100
    seed: int = 0
    dtype: str = "float32"
    evals_per_cycle: int = 10
    progress: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True  # false: train and print the summary, record nothing
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "mlplab"
    run_name: str | None = None
    log_model: bool = True
    parent_run_id: str | None = None


@dataclass
class GradcheckConfig:
    d: int = 20  # first d input dimensions
    n: int = 10  # first n training samples
    lam: float | None = None  # None: the top-level lam
    h: float = 1e-5
    order: int = 6
    eps: float = 1e-3
    threshold: float = 1e-6
    exclude_kinks: bool = True
    jitter: float = 0.1  # std of noise added to b, gamma, beta (0: check at their init)
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    bn: bool = False
    lam: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)


def register() -> None:
    """Make the schemas available to the YAML files under conf/ as defaults."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schedule", name="constant_schema", node=ConstantSchedule)
    cs.store(group="schedule", name="clr_schema", node=CyclicalSchedule)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _keys(node: DictConfig, prefix: str = ""):
    """(key, whether the schema knows it) for every key under `node`, dotted; a
    free-form node (a dict, such as `tags`) is not looked into."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    known = {f.name for f in dataclasses.fields(schema)}
    for key in node:
        yield f"{prefix}{key}", key in known
        child = node._get_node(key)
        if key in known and isinstance(child, DictConfig):
            yield from _keys(child, f"{prefix}{key}.")


def check_keys(cfg: DictConfig) -> None:
    """Refuse a key the schema does not know (added with `+`, which Hydra accepts),
    naming the closest known key: an ignored knob would train something else."""
    keys = dict(_keys(cfg))
    for key, known in keys.items():
        if not known:
            close = difflib.get_close_matches(key, [k for k, ok in keys.items() if ok], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{key}: not a config key; {hint}(only tags.* takes any key)",
                              key=key)


def validate(cfg: DictConfig) -> None:
    """Check value ranges that types cannot express; raise ConfigError naming the key."""
    check_keys(cfg)
    d, m, s, t = cfg.data, cfg.model, cfg.schedule, cfg.train
    _require(d.name in DATASETS, f"data.name={d.name!r}: allowed {DATASETS}")
    _require(d.split in SPLITS, f"data.split={d.split!r}: allowed {SPLITS}")
    _require(d.name != "digits" or d.split == "all",
             f"data.split={d.split!r} with data=digits: digits has no batches, allowed 'all'")
    _require(d.n_val > 0, f"data.n_val={d.n_val}: the validation split must not be empty (> 0)")
    _require(d.n_train is None or d.n_train > 0,
             f"data.n_train={d.n_train}: must be null (all) or > 0")
    _require(all(h > 0 for h in m.layers),
             f"model.layers={list(m.layers)}: hidden sizes must be > 0 ([] = softmax classifier)")
    _require(m.init in INITS, f"model.init={m.init!r}: allowed {INITS}")
    _require(_positive(m.init_std), f"model.init_std={m.init_std}: must be finite and > 0")
    _require(0 <= m.bn_momentum < 1, f"model.bn_momentum={m.bn_momentum}: must be in [0, 1)")
    _require(cfg.lam >= 0 and math.isfinite(cfg.lam),
             f"lam={cfg.lam}: the L2 strength must be finite and >= 0")
    _require(t.batch_size > 0, f"train.batch_size={t.batch_size}: must be > 0")
    _require(t.seed >= 0, f"train.seed={t.seed}: must be >= 0")
    _require(t.dtype in DTYPES, f"train.dtype={t.dtype!r}: allowed {DTYPES}")
    _require(t.evals_per_cycle > 0, f"train.evals_per_cycle={t.evals_per_cycle}: must be > 0")
    _require(s.name in SCHEDULES, f"schedule.name={s.name!r}: allowed {SCHEDULES}")
    if s.name == "constant":
        _require(_positive(s.eta), f"schedule.eta={s.eta}: must be finite and > 0")
        _require(s.epochs > 0, f"schedule.epochs={s.epochs}: must be > 0")
    else:
        _require(_positive(s.eta_min), f"schedule.eta_min={s.eta_min}: must be finite and > 0")
        _require(_positive(s.eta_max), f"schedule.eta_max={s.eta_max}: must be finite and > 0")
        _require(s.eta_min <= s.eta_max,
                 f"schedule.eta_min={s.eta_min} > schedule.eta_max={s.eta_max}: "
                 "eta_min must be <= eta_max")
        _require(s.cycles > 0, f"schedule.cycles={s.cycles}: must be > 0")
        _require((s.n_s is None) != (s.n_s_k is None),
                 f"schedule.n_s={s.n_s}, schedule.n_s_k={s.n_s_k}: set exactly one "
                 "(n_s steps, or n_s_k epochs' worth of steps)")
        _require(s.n_s is None or s.n_s > 0, f"schedule.n_s={s.n_s}: must be > 0")
        _require(s.n_s_k is None or s.n_s_k > 0, f"schedule.n_s_k={s.n_s_k}: must be > 0")


def validate_gradcheck(cfg: DictConfig) -> None:
    """Check the `gradcheck` section (the command also runs `validate`)."""
    g = cfg.gradcheck
    _require(g.d > 0, f"gradcheck.d={g.d}: the number of input dimensions must be > 0")
    _require(g.n > 0, f"gradcheck.n={g.n}: the number of samples must be > 0")
    _require(not (cfg.bn and g.n == 1),
             "gradcheck.n=1 with bn=true: batch norm maps a single sample to beta, so "
             "nothing before it gets a gradient; use n >= 2")
    _require(g.lam is None or g.lam >= 0,
             f"gradcheck.lam={g.lam}: must be null (the top-level lam) or >= 0")
    _require(g.h > 0, f"gradcheck.h={g.h}: the step must be > 0")
    _require(g.seed >= 0, f"gradcheck.seed={g.seed}: must be >= 0")
    _require(g.order in (2, 4, 6), f"gradcheck.order={g.order}: allowed (2, 4, 6)")
    _require(g.eps > 0, f"gradcheck.eps={g.eps}: must be > 0")
    _require(g.threshold > 0, f"gradcheck.threshold={g.threshold}: must be > 0")
    _require(g.jitter >= 0, f"gradcheck.jitter={g.jitter}: must be >= 0")

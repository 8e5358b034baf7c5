"""The config schema: what `conf/` may contain, and errors that name its keys.

OmegaConf enforces types while Hydra composes; `check_keys` refuses keys the schema
does not know (Hydra lets `+key=value` add any). Values are checked by the engine
itself (ArgumentError, see mlplab.engine.checks); `keyed` turns those errors into a
ConfigError naming the config key, so no check is written twice.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mlplab.app.errors import ConfigError
from mlplab.engine.checks import ArgumentError
from mlplab.engine.data import CIFAR10_MD5, CIFAR10_URL
from mlplab.trial import TrialConfig


@dataclass
class DataConfig:
    name: str = "cifar10"
    url: str = CIFAR10_URL
    md5: str = CIFAR10_MD5
    root: str | None = None  # None: $MLPLAB_DATA, else ~/.cache/mlplab
    split: str = "batch1"
    n_val: int = 5000
    val_fold: int = 0  # split all: which block of n_val rows (from the end) validates
    n_train: int | None = None


@dataclass
class ModelConfig:
    layers: list[int] = field(default_factory=lambda: [50])
    init: str = "he"
    init_std: float = 1e-2
    bn_momentum: float = 0.9
    dropout: Any = 0.0  # a rate for every hidden layer, or a list: one per hidden layer


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
class CosineSchedule:
    name: str = "cosine"
    eta: float = 0.05
    epochs: int = 30
    warmup_epochs: float = 1.0
    eta_min: float = 0.0


@dataclass
class SGDConfig:
    name: str = "sgd"


@dataclass
class MomentumConfig:
    name: str = "momentum"
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamConfig:
    name: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    weight_decay: float = 1e-2


@dataclass
class NoAugment:
    name: str = "none"


@dataclass
class FlipTranslateConfig:
    name: str = "flip_translate"
    max_shift: int = 4


@dataclass
class TrainConfig:
    batch_size: int = 100
    seed: int = 0
    dtype: str = "float32"
    evals_per_cycle: int = 10
    label_smoothing: float = 0.0
    eval_train_rows: int | None = 5000  # None: the whole training split
    threads: int | None = None  # BLAS threads of this run; None: every core it may use
    progress: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True  # false: train and print the summary, record nothing
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "mlplab"
    run_name: str | None = None
    log_model: bool = True
    log_plots: bool = True  # curves.png (and a 1-layer net's class templates)
    parent_run_id: str | None = None
    # set by the sweeper: its parent run by spool id (mlplab.app.spool), this run's own id
    parent_spool_id: str | None = None
    spool_id: str | None = None
    # how long a run that has ended waits for an unreachable store before it exits
    # with its record kept on disk (exit status 75; `mlplab-sync` delivers it)
    wait_seconds: float = 120.0


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
    optimizer: Any = MISSING
    augment: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    bn: bool = False
    lam: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)


def register() -> None:
    """Make the schemas available to the YAML files under conf/ as defaults."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"{name}_schema", node=node)


SCHEMAS = {  # group -> option -> schema, as conf/<group>/<option>.yaml use them
    "schedule": {"constant": ConstantSchedule, "clr": CyclicalSchedule,
                 "cosine": CosineSchedule},
    "optimizer": {"sgd": SGDConfig, "momentum": MomentumConfig, "adam": AdamConfig,
                  "adamw": AdamWConfig},
    "augment": {"none": NoAugment, "flip_translate": FlipTranslateConfig},
}


@contextmanager
def keyed(prefix: str = "", **renames: str) -> Iterator[None]:
    """Turn the engine's ArgumentError into a ConfigError naming the config key:
    `prefix + argument`, or `renames[argument]` (e.g. hidden='model.layers')."""
    try:
        yield
    except ArgumentError as err:
        key = renames.get(err.argument, prefix + err.argument)
        raise ConfigError(f"{key}={err.value!r}: {err.allowed}", key=key) from None


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


def validate_gradcheck(cfg: DictConfig) -> None:
    """Check the `gradcheck` section (the command also runs experiment.validate)."""
    from mlplab.engine import gradcheck

    g = cfg.gradcheck
    with keyed("gradcheck."):
        gradcheck.check_options(d=g.d, n=g.n, h=g.h, order=g.order, eps=g.eps,
                                threshold=g.threshold, jitter=g.jitter, seed=g.seed,
                                lam=g.lam, bn=cfg.bn)

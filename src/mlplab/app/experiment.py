"""An experiment from its config: the engine's dataset, schedule, network, optimiser
and augmentation.

The one place where config keys become engine arguments. The engine checks its own
arguments; an ArgumentError it raises comes out of here as a ConfigError naming the
config key (`mlplab.app.config.keyed`). `validate` builds what needs no data, so a bad
value stops a run before anything is loaded, trained or recorded.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig, ListConfig

from mlplab.app import config
from mlplab.app.config import ConfigError, keyed
from mlplab.engine import augment, checks, data, network, optim, schedules, trainer
from mlplab.engine.data import Dataset


def validate(cfg: DictConfig) -> None:
    """Every value checkable without the data; raises ConfigError naming the key."""
    config.check_keys(cfg)
    d, m, t = cfg.data, cfg.model, cfg.train
    with keyed("data.", dtype="train.dtype"):
        data.check_options(d.name, split=d.split, n_val=d.n_val, val_fold=d.val_fold,
                           n_train=d.n_train, dtype=t.dtype)
        checks.require(d.name != "digits" or d.split == "all", "split", d.split,
                       "with data=digits, which has no batches: allowed 'all'")
    with keyed("model.", hidden="model.layers"):
        network.check_architecture(list(m.layers), init=m.init, init_std=m.init_std,
                                   bn_momentum=m.bn_momentum, dropout=dropout_rates(cfg))
    with keyed("train.", lam="lam"):
        trainer.check_options(lam=cfg.lam, evals_per_cycle=t.evals_per_cycle,
                              label_smoothing=t.label_smoothing,
                              eval_train_rows=t.eval_train_rows, threads=t.threads)
        checks.positive_int("batch_size", t.batch_size)
        checks.non_negative_int("seed", t.seed)
    with keyed("tracking."):  # 0: do not wait for an unreachable store at a run's end
        checks.non_negative("wait_seconds", cfg.tracking.wait_seconds)
    build_schedule(cfg, n_train=t.batch_size)  # one step an epoch: the data's size aside
    build_optimizer(cfg)
    build_augment(cfg, augment.CIFAR_IMAGE_SHAPE)


def build_dataset(cfg: DictConfig) -> Dataset:
    """The run's data from the machine's shared cache of standardised splits (see
    mlplab.engine.data): every process of a sweep maps the same read-only copy, and a run
    holds it only while it trains, so a worker waiting for others holds none."""
    d = cfg.data
    return data.load_dataset(d.name, split=d.split, n_val=d.n_val, val_fold=d.val_fold,
                             n_train=d.n_train, url=d.url, md5=d.md5, root=d.root,
                             dtype=np.dtype(cfg.train.dtype), shared_cache=True)


def build_schedule(cfg: DictConfig, n_train: int):
    s, bs = cfg.schedule, cfg.train.batch_size
    if bs > n_train:
        raise ConfigError(f"train.batch_size={bs} is larger than the {n_train} training "
                          "rows: allowed 1.." + str(n_train), key="train.batch_size")
    with keyed("schedule."):
        checks.one_of("name", s.name, config.SCHEMAS["schedule"])
        if s.name == "constant":
            return schedules.Constant(s.eta, s.epochs)
        if s.name == "cosine":
            return schedules.Cosine(s.eta, s.epochs, s.warmup_epochs, s.eta_min)
        n_s = schedules.half_cycle(s.n_s, s.n_s_k, n_train, bs)
        return schedules.Cyclical(s.eta_min, s.eta_max, n_s, s.cycles)


def build_optimizer(cfg: DictConfig):
    """A fresh optimiser (it carries its state: one per run)."""
    settings = {k: v for k, v in cfg.optimizer.items() if k != "name"}
    with keyed("optimizer.", optimizer="optimizer.name"):
        return optim.make_optimizer(cfg.optimizer.name, **settings)


def build_augment(cfg: DictConfig, image_shape):
    """The batch augmentation, or None (`augment=none`)."""
    settings = {k: v for k, v in cfg.augment.items() if k != "name"}
    if cfg.augment.name != "none":
        settings["image_shape"] = tuple(image_shape)
    with keyed("augment.", augment="augment.name"):
        return augment.make_augment(cfg.augment.name, **settings)


def build_network(cfg: DictConfig, ds: Dataset, rng) -> network.Network:
    m = cfg.model
    with keyed("model.", hidden="model.layers"):
        return network.init_network(ds.X_train.shape[1], list(m.layers), ds.n_classes,
                                    bn=cfg.bn, init=m.init, init_std=m.init_std,
                                    bn_momentum=m.bn_momentum, dropout=dropout_rates(cfg),
                                    rng=rng, dtype=np.dtype(cfg.train.dtype))


def dropout_rates(cfg: DictConfig):
    """model.dropout as the engine takes it: a number, or a plain list of rates."""
    rate = cfg.model.dropout
    return list(rate) if isinstance(rate, ListConfig) else rate


def describe(net: network.Network, schedule) -> str:
    """One line: the network and the schedule (the run's `mlplab.summary` tag)."""
    if isinstance(schedule, schedules.Cyclical):
        sched = (f"CLR {schedule.eta_min:g}..{schedule.eta_max:g}, n_s={schedule.n_s}, "
                 f"{schedule.cycles} cycle(s)")
    elif isinstance(schedule, schedules.Cosine):
        sched = (f"cosine eta={schedule.eta:g}, {schedule.epochs} epochs, warm-up "
                 f"{schedule.warmup_epochs:g}")
    else:
        sched = f"constant eta={schedule.eta:g}, {schedule.epochs} epochs"
    return f"{net.arch}, {sched}"


def run_name(cfg: DictConfig, net: network.Network) -> str:
    """The run's name in MLflow's list unless tracking.run_name says otherwise: what
    a user would call it, e.g. '3072-50-50-10 BN lam=0.01 seed=0'."""
    arch = "-".join(map(str, net.sizes)) + (" BN" if net.bn else "")
    extras = [f"{cfg.optimizer.name}"] if cfg.optimizer.name != "sgd" else []
    if any(net.dropout):
        extras.append(f"drop={max(net.dropout):g}")
    if cfg.augment.name != "none":
        extras.append(cfg.augment.name)
    return " ".join([arch, *extras, f"lam={cfg.lam:g}", f"seed={cfg.train.seed}"])

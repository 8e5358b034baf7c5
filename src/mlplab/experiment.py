"""An experiment from its config: the engine's dataset, schedule and network.

The one place where config keys become engine arguments. The engine checks its own
arguments; an ArgumentError it raises comes out of here as a ConfigError naming the
config key (`mlplab.config.keyed`).
"""

from __future__ import annotations

import functools

import numpy as np
from omegaconf import DictConfig

from mlplab import data, network, schedules
from mlplab.config import ConfigError
from mlplab.data import Dataset


def build_dataset(cfg: DictConfig) -> Dataset:
    d = cfg.data
    return _load_dataset_cached(d.name, d.split, d.n_val, d.n_train, d.url, d.md5, d.root,
                                cfg.train.dtype)


@functools.lru_cache(maxsize=1)
def _load_dataset_cached(name, split, n_val, n_train, url, md5, root, dtype) -> Dataset:
    """The last dataset stays loaded: sweep trials in one process (Hydra's basic
    launcher, a joblib worker) share it instead of re-reading ~0.7 GB each. Nothing
    writes to a Dataset's arrays, so sharing is safe."""
    return data.load_dataset(name, split=split, n_val=n_val, n_train=n_train, url=url,
                             md5=md5, root=root, dtype=np.dtype(dtype))


def build_schedule(cfg: DictConfig, n_train: int):
    s, bs = cfg.schedule, cfg.train.batch_size
    if bs > n_train:
        raise ConfigError(f"train.batch_size={bs} is larger than the {n_train} training "
                          "rows: allowed 1.." + str(n_train), key="train.batch_size")
    if s.name == "constant":
        return schedules.Constant(s.eta, s.epochs)
    n_s = schedules.half_cycle(s.n_s, s.n_s_k, n_train, bs)
    return schedules.Cyclical(s.eta_min, s.eta_max, n_s, s.cycles)


def build_network(cfg: DictConfig, ds: Dataset, rng) -> network.Network:
    m = cfg.model
    return network.init_network(ds.X_train.shape[1], list(m.layers), ds.n_classes, bn=cfg.bn,
                                init=m.init, init_std=m.init_std, bn_momentum=m.bn_momentum,
                                rng=rng, dtype=np.dtype(cfg.train.dtype))


def describe(net: network.Network, schedule) -> str:
    """One line: the network and the schedule (the run's `mlplab.summary` tag)."""
    if isinstance(schedule, schedules.Cyclical):
        sched = (f"CLR {schedule.eta_min:g}..{schedule.eta_max:g}, n_s={schedule.n_s}, "
                 f"{schedule.cycles} cycle(s)")
    else:
        sched = f"constant eta={schedule.eta:g}, {schedule.epochs} epochs"
    return f"{net.arch}, {sched}"


def run_name(cfg: DictConfig, net: network.Network) -> str:
    """The run's name in MLflow's list unless tracking.run_name says otherwise: what
    a user would call it, e.g. '3072-50-50-10 BN lam=0.01 seed=0'."""
    arch = "-".join(map(str, net.sizes)) + (" BN" if net.bn else "")
    return f"{arch} lam={cfg.lam:g} seed={cfg.train.seed}"

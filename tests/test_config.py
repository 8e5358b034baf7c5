"""Bad configuration fails before any training or tracking, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from mlplab.app.config import ConfigError
from mlplab.app.experiment import build_dataset
from mlplab.commands.train import run_experiment
from mlplab.engine.data import DataError


@pytest.mark.parametrize("override, message", [
    ("lam=-0.1", "lam=-0.1"),
    ("train.batch_size=-5", "train.batch_size=-5"),
    ("tracking.wait_seconds=-1", "tracking.wait_seconds=-1.0: must be finite and >= 0"),
    ("train.batch_size=0", "train.batch_size=0"),
    ("schedule.eta_min=0.5", "schedule.eta_min=0.5: must be <= eta_max"),
    ("data.n_val=0", "data.n_val=0"),
    ("data.split=batch9", "data.split='batch9'"),
    ("data.n_train=0", "data.n_train=0"),
    ("data.val_fold=-1", "data.val_fold=-1"),
    ("data.val_fold=1", "data.val_fold=1: with split='batch1'"),
    ("model.layers=[50,0]", "model.layers=[50, 0]"),
    ("model.init=glorot", "model.init='glorot'"),
    ("train.dtype=float16", "train.dtype='float16'"),
    ("schedule.n_s_k=2", "set exactly one"),
    ("model.bn_momentum=1.5", "model.bn_momentum=1.5"),
    ("train.seed=-1", "train.seed=-1"),
    ("schedule.eta_max=inf", "schedule.eta_max=inf"),
    ("lam=inf", "lam=inf"),
    ("model.init_std=nan", "model.init_std=nan"),
    ("data=digits data.split=batch1", "data.split='batch1': with data=digits"),
    # checked by the engine (ArgumentError), named here by the config key
    ("schedule.cycles=0", "schedule.cycles=0"),
    ("schedule.n_s=0", "schedule.n_s=0"),
    ("train.evals_per_cycle=0", "train.evals_per_cycle=0"),
    ("schedule=constant schedule.eta=-1", "schedule.eta=-1"),
    ("schedule=cosine schedule.warmup_epochs=40 schedule.epochs=30",
     "schedule.warmup_epochs=40"),
    ("model.dropout=1.0", "model.dropout=1.0"),
    ("model.dropout=-0.1", "model.dropout=-0.1"),
    ("model.layers=[50] model.dropout=[0.1,0.2]", "model.dropout=[0.1, 0.2]"),
    ("optimizer=momentum optimizer.momentum=1.2", "optimizer.momentum=1.2"),
    ("optimizer=adam optimizer.beta1=1.0", "optimizer.beta1=1.0"),
    ("optimizer=adamw optimizer.beta2=-0.5", "optimizer.beta2=-0.5"),
    ("optimizer=adam optimizer.eps=0", "optimizer.eps=0"),
    ("optimizer.name=rmsprop", "optimizer.name='rmsprop'"),
    ("augment=flip_translate augment.max_shift=16", "augment.max_shift=16"),
    ("augment.name=mixup", "augment.name='mixup'"),
    ("train.label_smoothing=1.0", "train.label_smoothing=1.0"),
    ("train.eval_train_rows=0", "train.eval_train_rows=0: must be an integer > 0"),
    ("train.threads=0", "train.threads=0: must be an integer > 0"),
])
def test_bad_values_fail_before_anything_is_recorded(make_cfg, tracking_uri, override, message):
    cfg = make_cfg(*override.split())
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_experiment(cfg)
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_batch_larger_than_the_training_split_fails_before_tracking(make_cfg, tracking_uri):
    cfg = make_cfg("data.n_train=5", "train.batch_size=10")
    with pytest.raises(ConfigError, match="train.batch_size=10 is larger than the 5"):
        run_experiment(cfg)
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_a_val_fold_beyond_the_data_fails_before_tracking_naming_the_bound(make_cfg,
                                                                          tracking_uri):
    cfg = make_cfg("data.split=all", "data.n_val=100", "data.val_fold=3")  # 300 rows
    with pytest.raises(DataError, match=r"data.val_fold=3 with data.n_val=100 must be "
                                        r"between 0 and 2"):
        run_experiment(cfg)
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_each_val_fold_is_its_own_dataset(make_cfg):
    """The loaded dataset is cached per process: a sweep's folds must not share it."""
    a, b = (build_dataset(make_cfg("data.split=all", "data.n_val=50", f"data.val_fold={k}"))
            for k in (0, 1))
    assert a.fingerprint != b.fingerprint and len(a.y_val) == len(b.y_val) == 50


@pytest.mark.parametrize("override, message", [
    ("lam=abc", "lam"),                       # wrong type
    ("model.layers=[50,x]", "layers"),        # wrong element type
    ("model.depth=3", "depth"),               # unknown key
    ("train.batch_size=1.5", "batch_size"),   # float for an int
    ("bn=maybe", "bn"),
])
def test_wrong_types_and_unknown_keys_fail_while_composing(make_cfg, override, message):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(override)
    assert message in str(err.value) + str(err.value.__cause__)


def test_the_default_config_composes_to_the_documented_baseline(make_cfg):
    cfg = make_cfg()
    assert list(cfg.model.layers) == [50]
    assert cfg.schedule.name == "clr" and cfg.schedule.n_s == 500
    assert cfg.lam == 0.01 and cfg.bn is False and cfg.data.split == "batch1"


@pytest.mark.parametrize("override", ["optimizer=rmsprop", "augment=mixup"])
def test_an_unknown_optimizer_or_augment_option_lists_the_available_ones(make_cfg, override):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(override)
    assert "Available options" in str(err.value)

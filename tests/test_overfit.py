"""experiment=overfit: the sanity check that training drives the loss of 100 samples,
unregularised, close to zero (the real copy when present, and the tiny archive)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from mlplab.commands.train import run_experiment


def test_overfit_experiment_pins_100_samples_no_regularisation_200_constant_epochs(make_cfg):
    cfg = make_cfg("experiment=overfit")

    assert cfg.data.n_train == 100 and cfg.data.split == "batch1"
    assert cfg.lam == 0
    assert cfg.schedule.name == "constant" and cfg.schedule.epochs == 200
    assert cfg.train.batch_size == 10
    assert cfg.tracking.experiment == "sanity" and cfg.tracking.run_name == "overfit"


def _assert_overfits(outcome, max_loss):
    losses = MlflowClient(outcome.tracking_uri).get_metric_history(outcome.run_id,
                                                                   "train_loss")
    assert len(losses) == 201  # every epoch, and before the first
    assert min(losses, key=lambda m: m.step).value > 1.0  # starts near chance (ln 10)
    assert outcome.final["train_loss"] < max_loss
    assert outcome.final["train_acc"] == 1.0


def test_overfit_drives_the_training_loss_near_zero_on_the_tiny_archive(make_cfg):
    # the tiny archive's training split has 60 rows
    outcome = run_experiment(make_cfg("experiment=overfit", "data.n_train=50"))
    _assert_overfits(outcome, max_loss=0.01)


@pytest.mark.slow
def test_overfit_drives_the_training_loss_near_zero_on_real_cifar(make_cfg, shared_cifar):
    url, md5 = shared_cifar
    outcome = run_experiment(make_cfg("experiment=overfit", f"data.url={url}",
                                      f"data.md5={md5}"))
    _assert_overfits(outcome, max_loss=0.01)  # measured: 0.0036 after 200 epochs

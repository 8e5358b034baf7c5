"""The reference result on the real CIFAR-10 copy (skipped when it is absent)."""

from __future__ import annotations

import pytest

from mlplab.app import run_experiment

pytestmark = pytest.mark.slow


def test_two_layer_one_cycle_reaches_the_reports_accuracy(make_cfg, shared_cifar, tmp_path):
    url, md5 = shared_cifar
    cfg = make_cfg(f"data.url={url}", f"data.md5={md5}", "data.split=batch1",
                   "model.layers=[50]", "lam=0.01", "train.batch_size=100",
                   "schedule=clr", "schedule.n_s=500", "schedule.cycles=1")
    first = run_experiment(cfg)
    assert first.final["test_acc"] >= 0.44  # the reports: ~46%
    again = run_experiment(cfg)  # same config and seed: the same numbers
    assert again.final == first.final

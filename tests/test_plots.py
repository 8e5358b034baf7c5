"""The per-run figures."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from mlplab.app import plots


def _history(n: int, scale: float) -> list[dict]:
    return [{"step": 10 * i, "train_cost": scale / (i + 1), "val_cost": scale / (i + 2),
             "train_loss": 1.0, "val_loss": 0.5 + i / n, "train_acc": i / n,
             "val_acc": 0.3} for i in range(n)]


def test_a_runs_curves_show_only_its_own_data_when_the_figure_is_reused(tmp_path):
    # One process draws every trial's figure; the second must not keep the first's
    # data, scales or title.
    plots.plot_curves(_history(40, 9.0), tmp_path / "first.png", title="first")
    plots.plot_curves(_history(5, 1.0), tmp_path / "reused.png", title="second")
    plots._curves = None  # as in a fresh process
    plots.plot_curves(_history(5, 1.0), tmp_path / "fresh.png", title="second")
    reused, fresh = (mpimg.imread(tmp_path / f"{n}.png") for n in ("reused", "fresh"))
    assert np.array_equal(reused, fresh)
    assert not np.array_equal(mpimg.imread(tmp_path / "first.png"), fresh)

"""Is the training curve on a subset of rows the same curve, within its noise?

    python bench/eval_subset.py [--experiments three_layer,three_layer_bn,two_layer_three_cycles]
        [--rows 5000] [--out docs/figures/train_curve_subset.png]

Trains each report setting once (`experiment=NAME`, untracked) and at every
evaluation point measures the training split twice: whole, and on the `--rows` evenly
spaced rows that `train.eval_train_rows` evaluates (5,000 by default, 1,000 in a
search's trials). Prints per setting
the largest difference between the two curves, in accuracy and in loss, against the
subset's own noise (the binomial standard error of an accuracy p measured on n rows,
sqrt(p (1 - p) / n)), and plots the two accuracy curves side by side with validation.
Needs the data from the environment as any run (README).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from hydra import compose, initialize_config_dir

from mlplab.app import plots
from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import prepare
from mlplab.engine import network, trainer


def both_curves(name: str, rows: int) -> list[dict]:
    """One training of experiment NAME; per evaluation point the whole split's and the
    subset's train loss and accuracy, and validation's."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"experiment={name}", "tracking.enabled=false",
                                 "train.progress=false", f"train.eval_train_rows={rows}"])
    ds, net, _, train = prepare(cfg)
    subset = trainer.eval_rows(len(ds.y_train), rows)
    points = []

    def on_eval(rec):
        whole = network.evaluate(net, ds.X_train, ds.y_train, cfg.lam)
        sub = network.evaluate(net, ds.X_train[subset], ds.y_train[subset], cfg.lam)
        assert sub["acc"] == rec["train_acc"], "the run evaluates the same rows"
        points.append({"step": rec["step"], "whole_acc": whole["acc"], "sub_acc": sub["acc"],
                       "whole_loss": whole["loss"], "sub_loss": sub["loss"],
                       "val_acc": rec["val_acc"]})

    train(on_eval=on_eval)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", default="three_layer,three_layer_bn,"
                        "two_layer_three_cycles")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--out", default=None, help="where to draw the curves (PNG)")
    args = parser.parse_args()
    curves = {}
    for name in args.experiments.split(","):
        pts = curves[name] = both_curves(name, args.rows)
        gaps = [abs(p["sub_acc"] - p["whole_acc"]) for p in pts]
        noise = [math.sqrt(p["whole_acc"] * (1 - p["whole_acc"]) / args.rows) for p in pts]
        loss = max(abs(p["sub_loss"] - p["whole_loss"]) for p in pts)
        within = sum(g <= 2 * s for g, s in zip(gaps, noise, strict=True))
        print(f"{name}: {len(pts)} points; train accuracy, subset - whole: largest "
              f"{max(gaps):.4f}, mean {np.mean(gaps):.4f} (the subset's standard error "
              f"{np.mean(noise):.4f}; {within} of {len(pts)} points within 2 of it); "
              f"final {pts[-1]['sub_acc']:.4f} vs {pts[-1]['whole_acc']:.4f}; largest loss "
              f"difference {loss:.4f}", flush=True)
    if args.out:
        columns = {"whole": "training split whole", "sub": f"{args.rows} of its rows"}
        plots.plot_curve_grid(
            {(name, label): [{"step": p["step"], "train_acc": p[f"{kind}_acc"],
                              "val_acc": p["val_acc"]} for p in pts]
             for name, pts in curves.items() for kind, label in columns.items()},
            args.out, title="training curve on the whole split and on the subset",
            curve=("acc", "accuracy"))


if __name__ == "__main__":
    main()

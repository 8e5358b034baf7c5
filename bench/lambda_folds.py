"""Does validation see what test sees about lambda? The lambda search's setting, many folds.

    python bench/lambda_folds.py [--lams 3e-4,1e-3,4e-3,1e-2] [--folds 0-9]
        [--reference 4e-3] [-- EXTRA OVERRIDES]

Trains each lambda in the setting of lambda_c2f's stage 1 (`+search=lambda_c2f
schedule.cycles=3`: 45,000 train, 5,000 validation, 3 cycles) on each validation
fold (`data.val_fold=F`, the F-th block of 5,000 rows from the end, trained with
`train.seed=F`; folds 0-9 validate once on each of the 50,000 training-batch images),
and records which validation and test images each run gets right. Then per lambda,
against --reference:

- the mean accuracy over folds, on validation and on test;
- on validation, the mean difference with its standard error over folds: each fold
  has its own images and its own training runs, so this error holds both;
- on test, the mean difference with two standard errors, as every fold tests on the
  same 10,000 images: over runs (the per-fold differences: training noise) and over
  images (each image's correctness averaged over the folds first: the luck of the
  test sample).

A difference that test shows beyond both of its errors while validation shows none
within its error is one that no choice made on validation can be relied on to find:
a real effect that validation misses (its error bounds how large), or a shift
between the held-out training rows and the test batch. Every (lambda, fold) is
checked before the first trains, the highest fold against the data. Needs the data
from the environment as any run (README). Nothing is tracked. About 10 s a run alone
here.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from hydra import compose, initialize_config_dir

from mlplab.app import experiment
from mlplab.app.config import ConfigError
from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import prepare
from mlplab.engine import network
from mlplab.engine.data import DataError


def folds(text: str) -> list[int]:
    """'0-9' or '0,2,5': distinct folds, each once (a repeat would count the same
    validation images twice)."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            out = list(range(first, last + 1))
        else:
            out = [int(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(
            f"{text!r}: allowed FIRST-LAST (FIRST <= LAST) or F,F,... of distinct folds >= 0")
    return out


def lambdas(text: str) -> list[float]:
    """'3e-4,1e-3': distinct lambdas."""
    try:
        out = [float(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed distinct numbers, comma-separated")
    return out


def composed(lam: float, fold: int, extra: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["+search=lambda_c2f", "schedule.cycles=3",
                                            f"lam={lam}", f"data.val_fold={fold}",
                                            f"train.seed={fold}", *extra])


def right_answers(cfg) -> tuple[np.ndarray, np.ndarray]:
    """Which validation and test images one run classifies correctly."""
    ds, net, _, train = prepare(cfg)
    train()

    def right(X, y):
        return network.predict_scores(net, X).argmax(axis=1) == y

    return right(ds.X_val, ds.y_val), right(ds.X_test, ds.y_test)


def mean_and_error(d) -> tuple[float, float]:
    """Mean and standard error (in points) of independent differences d."""
    d = 100 * np.asarray(d, dtype=float)
    return d.mean(), d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lams", default=[3e-4, 1e-3, 4e-3, 1e-2], type=lambdas)
    p.add_argument("--folds", default=list(range(10)), type=folds)
    p.add_argument("--reference", default=4e-3, type=float)
    p.add_argument("extra", nargs="*", help="overrides after --, e.g. train.batch_size=100")
    args = p.parse_args(argv)
    lams = args.lams + ([] if args.reference in args.lams else [args.reference])
    runs = {(lam, fold): composed(lam, fold, args.extra) for fold in args.folds for lam in lams}
    try:
        for cfg in runs.values():
            experiment.validate(cfg)
        experiment.build_dataset(runs[lams[0], max(args.folds)])  # the data's bound on folds
    except (ConfigError, DataError) as err:
        p.error(str(err))

    val: dict[float, list] = {lam: [] for lam in lams}
    test: dict[float, list] = {lam: [] for lam in lams}
    for (lam, fold), cfg in runs.items():  # fold outermost: one dataset load per fold
        t0 = time.perf_counter()
        v, t = right_answers(cfg)
        val[lam].append(v)
        test[lam].append(t)
        print(f"fold {fold} lam {lam:g}: val {100 * v.mean():.2f} test "
              f"{100 * t.mean():.2f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    ref = args.reference
    print(f"\n{len(args.folds)} folds ({sum(len(v) for v in val[ref])} validation images, "
          f"{len(test[ref][0])} test); differences to lam={ref:g} in points, ± standard "
          "error: over folds on validation; over runs, then over images, on test")
    print(f"{'lam':>8} {'val':>6} {'test':>6} {'val - ref':>14} {'test - ref':>22}")
    for lam in lams:
        dv, sv = mean_and_error([a.mean() - b.mean()
                                 for a, b in zip(val[lam], val[ref], strict=True)])
        dt, st_runs = mean_and_error([a.mean() - b.mean()
                                      for a, b in zip(test[lam], test[ref], strict=True)])
        _, st_images = mean_and_error(np.mean(test[lam], axis=0) - np.mean(test[ref], axis=0))
        print(f"{lam:8.1e} {100 * np.mean([v.mean() for v in val[lam]]):6.2f} "
              f"{100 * np.mean([t.mean() for t in test[lam]]):6.2f} {dv:+7.2f} ± {sv:4.2f} "
              f"{dt:+7.2f} ± {st_runs:4.2f} ± {st_images:4.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

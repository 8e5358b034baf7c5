"""Does validation see what test sees about lambda? The lambda search's setting, many folds.

    python bench/lambda_folds.py [--lams 3e-4,1e-3,4e-3,1e-2] [--folds 0-6]
        [--reference 4e-3] [-- EXTRA OVERRIDES]

Trains each lambda in the setting of lambda_c2f's stage 1 (`+search=lambda_c2f
schedule.cycles=3`: 45,000 train, 5,000 validation, 3 cycles) on each validation
fold (`data.val_fold=F`, the F-th block of 5,000 rows from the end, trained with
`train.seed=F`), and records which validation and test images each run gets right.
Then per lambda, against --reference:

- the mean accuracy over folds, on validation and on test;
- the difference to the reference, with its standard error over images: on
  validation from every fold's own 5,000 images (35,000 with 7 folds), on test from
  the same 10,000 images (each image's correctness averaged over the folds first, so
  the error is the test sample's, not the training noise).

A difference the validation images cannot see (within their standard error) but the
test images show is the test sample's luck, or a shift between the two; either way
no choice made on validation can be relied on to find it. Needs the data from the
environment as any run (README). Nothing is tracked. About 10 s a run alone here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from hydra import compose, initialize_config_dir

from mlplab import network
from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import prepare


def folds(text: str) -> list[int]:
    """'0-6' or '0,2,5'."""
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def right_answers(lam: float, fold: int, extra: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Which validation and test images one run classifies correctly."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+search=lambda_c2f", "schedule.cycles=3",
                                           f"lam={lam}", f"data.val_fold={fold}",
                                           f"train.seed={fold}", *extra])
    ds, net, _, train = prepare(cfg)
    train()

    def right(X, y):
        return network.predict_scores(net, X).argmax(axis=1) == y

    return right(ds.X_val, ds.y_val), right(ds.X_test, ds.y_test)


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over images of a - b (per-image 0/1 or averages)."""
    d = a.astype(float) - b.astype(float)
    return 100 * d.mean(), 100 * d.std(ddof=1) / np.sqrt(len(d))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lams", default="3e-4,1e-3,4e-3,1e-2")
    p.add_argument("--folds", default="0-6", type=folds)
    p.add_argument("--reference", default=4e-3, type=float)
    p.add_argument("extra", nargs="*", help="overrides after --, e.g. train.batch_size=100")
    args = p.parse_args(argv)
    lams = [float(x) for x in args.lams.split(",")]
    if args.reference not in lams:
        lams.append(args.reference)
    val: dict[float, list] = {lam: [] for lam in lams}
    test: dict[float, list] = {lam: [] for lam in lams}
    for fold in args.folds:  # fold outermost: one dataset load per fold
        for lam in lams:
            t0 = time.perf_counter()
            v, t = right_answers(lam, fold, args.extra)
            val[lam].append(v)
            test[lam].append(t)
            print(f"fold {fold} lam {lam:g}: val {100 * v.mean():.2f} test "
                  f"{100 * t.mean():.2f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    ref = args.reference
    n_val = sum(len(v) for v in val[ref])
    print(f"\n{len(args.folds)} folds; differences to lam={ref:g} with their standard error "
          f"over images ({n_val} validation, {len(test[ref][0])} test)")
    print(f"{'lam':>8} {'val':>7} {'test':>7} {'val - ref':>16} {'test - ref':>16}")
    for lam in lams:
        mean_val = statistics.fmean(100 * v.mean() for v in val[lam])
        mean_test = statistics.fmean(100 * t.mean() for t in test[lam])
        dv, sv = difference(np.concatenate(val[lam]), np.concatenate(val[ref]))
        dt, st = difference(np.mean(test[lam], axis=0), np.mean(test[ref], axis=0))
        print(f"{lam:8.1e} {mean_val:7.2f} {mean_test:7.2f} {dv:+8.2f} ± {sv:5.2f} "
              f"{dt:+8.2f} ± {st:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do the model-based samplers find better points than random search at equal budget?

    python bench/bench_samplers.py [--trials 20] [--seeds 5] [--samplers random,tpe,gp]
        [--epochs 1] [--n-train 10000] [--startup N]

The problem: best_mlp's recipe (3072-1024-1024-10, BN, flip/translate, Nesterov, cosine)
trained for `--epochs` epochs on the first `--n-train` training rows, scored by its
validation accuracy on the usual 5,000 rows, over best_mlp's dimensions with the
ranges a user would start from without the hand tuning (SPACE below). Every trial
trains with train.seed 0, so a point's score is a fixed number and samplers differ
only in the points they choose. Each sampler is built from the sweeper's own setting
(`hydra.sweeper.sampler`: the name, Optuna's defaults bar the start-up, which the
sweeper's rule fits to the budget, or `--startup N` for the model-based ones) with
sampler seeds 0..seeds-1; the samplers are
interleaved seed by seed, so a slow spell of the machine hits all alike. Prints, per
sampler, the best validation accuracy after each quarter of the budget: mean and
standard error over the seeds, and the difference to random in standard errors.
GP needs PyTorch, which mlplab does not install: it is left out when missing.
Needs the data from the environment as any run (README).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time

import optuna
from hydra import compose, initialize_config_dir

from hydra_plugins.mlplab_optuna_sweeper import _samplers, _space
from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import prepare

SPACE = {  # best_mlp's dimensions, wide: where a search starts without hand tuning
    "schedule.eta": "tag(log, interval(0.005, 1.0))",
    "lam": "tag(log, interval(1e-6, 1e-2))",
    "train.label_smoothing": "interval(0.0, 0.4)",
    "augment.max_shift": "choice(0, 2, 4, 6)",
    "model.dropout": "interval(0.0, 0.6)",
}


def run(sampler_name: str, seed: int, trials: int, fixed: list[str],
        startup: int | None = None) -> list[float]:
    """The validation accuracy of each trial, in order, of one search."""
    params, _ = _space.parse([f"{k}={v}" for k, v in SPACE.items()])
    spec = _samplers.spec(sampler_name)
    if startup is not None and _samplers.learns(spec):
        spec[_samplers.STARTUP] = startup
    startup = _samplers.startup(spec, trials, "bench")
    study = optuna.create_study(direction="maximize",
                                sampler=_samplers.make(spec, seed, startup))
    scores = []
    for _ in range(trials):
        trial = study.ask()
        point = _space.suggest(trial, params)
        cfg = compose("config", [*fixed, *(p.override(point[p.name]) for p in params)])
        _, _, _, train = prepare(cfg)
        value = train().final["val_acc"]
        study.tell(trial, value if math.isfinite(value) else 0.0)
        scores.append(value if math.isfinite(value) else 0.0)
    return scores


def best_after(scores: list[float], n: int) -> float:
    return max(scores[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samplers", default="random,tpe,gp")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--startup", type=int, default=None,
                        help="n_startup_trials of the model-based samplers")
    args = parser.parse_args()
    samplers = args.samplers.split(",")
    if "gp" in samplers and importlib.util.find_spec("torch") is None:
        print("gp left out: Optuna's GPSampler needs PyTorch, which is not installed")
        samplers.remove("gp")
    fixed = ["experiment=best_mlp", "tracking.enabled=false", "train.progress=false",
             f"schedule.epochs={args.epochs}", "schedule.warmup_epochs=0.2",
             f"data.n_train={args.n_train}", "train.eval_train_rows=1000",
             "train.evals_per_cycle=1"]
    print(f"space: {SPACE}\nfixed: {fixed}\n{args.trials} trials, sampler seeds "
          f"0..{args.seeds - 1}, samplers {samplers}, start-up {args.startup or 'the rule'}")
    results: dict[str, list[list[float]]] = {s: [] for s in samplers}
    t0 = time.perf_counter()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for seed in range(args.seeds):
            for name in samplers:  # interleaved: seed by seed
                scores = run(name, seed, args.trials, fixed, args.startup)
                results[name].append(scores)
                print(f"seed {seed} {name:>6}: best {max(scores):.4f}  "
                      f"({time.perf_counter() - t0:.0f} s)  "
                      + " ".join(f"{v:.3f}" for v in scores), flush=True)
    quarters = sorted({max(1, args.trials * q // 4) for q in (1, 2, 3, 4)})
    print(f"\nbest validation accuracy after n trials: mean ± standard error over "
          f"{args.seeds} seeds (difference to random in standard errors of the difference)")
    print(f"{'sampler':>8} " + " ".join(f"{'n=' + str(n):>22}" for n in quarters))
    for name in samplers:
        cells = []
        for n in quarters:
            best = [best_after(s, n) for s in results[name]]
            mean, se = statistics.fmean(best), statistics.stdev(best) / math.sqrt(len(best))
            cell = f"{100 * mean:.2f} ± {100 * se:.2f}"
            if name != "random":
                ref = [best_after(s, n) for s in results["random"]]
                se_diff = math.hypot(se, statistics.stdev(ref) / math.sqrt(len(ref)))
                z = (mean - statistics.fmean(ref)) / se_diff if se_diff else float("nan")
                cell += f" ({z:+.1f})"
            cells.append(f"{cell:>22}")
        print(f"{name:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()

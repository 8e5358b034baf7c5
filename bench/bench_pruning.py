"""What pruning saves on a search: wall time and final test accuracy, against none.

    python bench/bench_pruning.py [--rounds 3] [--search lambda_c2f]
        [--variant NAME='OVERRIDES' ...] [--out FOLDER] [-- EXTRA OVERRIDES]

Each round runs every variant's sweep once (`python train.py --multirun +search=S
OVERRIDES EXTRA`), the leading variant rotating from round to round, each sweep in a
fresh folder of its own (its own mlflow.db, mlruns/ and Optuna journal, so nothing is
resumed or cached between sweeps). The data comes from the environment, as for any
run (README: MLPLAB_CIFAR10_URL, MLPLAB_CIFAR10_MD5, MLPLAB_DATA); the first sweep
fills the cache, so a warm-up sweep of the first variant runs before the rounds
(--no-warmup skips it). Per sweep: wall and CPU time, peak RSS, trials
complete/pruned/failed per stage (from the sweep's trials.csv: a failed trial is work
not done, which would flatter the time), the chosen parameters and `final_test_acc`
(from the parent run). Then per variant the median wall (and CPU) time and the median
of its per-round ratios to the first variant (`none` by default): this machine has
slow spells lasting minutes, and a ratio within a round survives them better than a
ratio of medians. Overrides in --variant are split like a shell command line; give
the sweep no storage or tracking URI of its own, or it is no longer fresh.
Time it alone on the machine: two CPU-heavy jobs distort each other's timings.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = {
    "none": "hydra.sweeper.pruner=none",
    # the recommendation for lambda_c2f (conf/search/lambda_c2f.yaml, README)
    "median": "hydra.sweeper.pruner=median hydra.sweeper.top_k=2",  # knobs: the search's
}


def run_sweep(folder: Path, search: str, overrides: list[str]) -> dict:
    """One sweep in `folder`: wall and CPU seconds, peak RSS (GB) and what it recorded."""
    folder.mkdir(parents=True)
    # its own store even if the environment names a shared one (MLFLOW_TRACKING_URI)
    cmd = [sys.executable, str(REPO / "train.py"), "--multirun", f"+search={search}",
           f"hydra.sweep.dir={folder / 'sweep'}",
           f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", *overrides]
    with open(folder / "log.txt", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}): {shlex.join(cmd)}\n"
                         f"see {folder / 'log.txt'}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_gb": usage.ru_maxrss / 2**20, **recorded(folder)}


def recorded(folder: Path) -> dict:
    """The parent run's final_test_acc and best_<param> metrics, and its trials.csv counts."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, filter_string="metrics.final_test_acc >= 0")
    if len(parents) != 1:
        raise SystemExit(f"{folder}: expected one sweep with final_test_acc, "
                         f"found {len(parents)}")
    parent = parents[0]
    table = client.download_artifacts(parent.info.run_id, "trials.csv", str(folder))
    with open(table) as f:
        counts = Counter((row["stage"], row["state"]) for row in csv.DictReader(f))
    stages = sorted({stage for stage, _ in counts if stage.isdigit()}, key=int)
    return {"test": parent.data.metrics["final_test_acc"],
            "chose": {k.removeprefix("best_"): float(f"{v:.3g}")
                      for k, v in parent.data.metrics.items()
                      if k.startswith("best_") and k != "best_value"},
            "trials": ", ".join(f"{counts[s, 'COMPLETE']}/{counts[s, 'PRUNED']}/"
                                f"{counts[s, 'FAIL']}" for s in stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search", default="lambda_c2f", help="conf/search/NAME")
    parser.add_argument("--variant", action="append", metavar="NAME='OVERRIDES'",
                        help="a sweep to compare (repeat); the first is the baseline; "
                             "default: none, then the median recommendation")
    parser.add_argument("--out", help="folder for the sweeps (default: a temporary one)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up sweep (the data cache is already filled)")
    parser.add_argument("extra", nargs="*", help="overrides for every sweep (after --)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # for trials.csv
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be at least 1")
    variants = dict(DEFAULT_VARIANTS)
    if args.variant:
        variants = {}
        for v in args.variant:
            name, sep, overrides = v.partition("=")
            if not (sep and name.isidentifier()) or name in variants:
                raise SystemExit(f"--variant {v!r}: must be NAME=OVERRIDES, NAME a word "
                                 "used once")
            variants[name] = overrides
    out = Path(args.out or tempfile.mkdtemp(prefix="mlplab-prune-")).resolve()
    names = list(variants)

    def sweep(name: str, label: str) -> dict:
        result = run_sweep(out / label, args.search,
                           [*shlex.split(variants[name]), *args.extra])
        print(f"{label:>12}: {result['wall']:7.1f} s  cpu {result['cpu']:7.1f} s  "
              f"{result['rss_gb']:.2f} GB  "
              f"complete/pruned/failed by stage {result['trials']}  chose {result['chose']}  "
              f"final_test_acc {result['test']:.4f}", flush=True)
        return result

    print(f"sweeps in {out}; +search={args.search} {shlex.join(args.extra)}")
    if args.warmup:
        sweep(names[0], "warmup")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            results[name].append(sweep(name, f"{name}_{r}"))

    base = names[0]
    for what in ("wall", "cpu"):
        print(f"\n{'variant':>12}  median {what}  median ratio to {base} (per round)  "
              f"median final_test_acc")
        for name in names:
            own = [x[what] for x in results[name]]
            ratios = [x[what] / b[what]
                      for x, b in zip(results[name], results[base], strict=True)]
            tests = [x["test"] for x in results[name]]
            print(f"{name:>12}  {median(own):9.1f} s  {median(ratios):6.3f}x "
                  f"({', '.join(f'{q:.3f}' for q in ratios)})  {median(tests):.4f}")


if __name__ == "__main__":
    main()

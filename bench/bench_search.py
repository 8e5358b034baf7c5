"""A shipped search's wall time, where it goes, its memory, and its distance from the floor.

    python bench/bench_search.py [--rounds 3] [--search lambda_c2f] [--out FOLDER]
        [-- EXTRA OVERRIDES]

Each round runs `python train.py --multirun +search=S EXTRA` as a user would, in a
fresh folder (its own mlflow.db, mlruns/ and Optuna journal), with the data from the
environment as for any run (README: MLPLAB_CIFAR10_URL, MLPLAB_CIFAR10_MD5,
MLPLAB_DATA; the shared data cache is filled before the first round, as a user's is
after their first run). Per round it prints:
- the wall time, and the peak memory of all the search's processes together: the sum
  of their PSS (/proc/PID/smaps_rollup, sampled every 0.2 s), in which pages that
  processes share (the data cache) count once;
- where the workers' time went, in core-seconds: update steps, evaluation and
  tracking as each trial's run logged them, and the rest (start-up, the sweeper,
  Hydra's job set-up, waiting at a stage's end); and the per-trial overhead: between
  one trial's start and the same worker's next, what is neither steps nor evaluation;
- the bare update steps of the same trials (each trial's logged config retrained
  in this process, one BLAS thread, untracked: its `train_seconds`), back to back on
  one core, and the ratio of the search's wall time to them; the chosen parameters
  and `final_test_acc`.
Rounds alternate the search and its bare retraining, so a slow spell of the machine
falls on both; the ratio printed last is the median of the rounds' ratios.
Time it alone on the machine: two CPU-heavy jobs distort each other's timings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

from bench_pruning import recorded

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 0.2


def tree_pss(root: int) -> int:
    """Summed PSS (bytes) of `root` and all its descendants."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # ended meanwhile
    return total


def run_search(folder: Path, search: str, overrides: list[str]) -> dict:
    """The search in `folder`: wall seconds and peak summed PSS (GB)."""
    folder.mkdir(parents=True)
    cmd = [sys.executable, str(REPO / "train.py"), "--multirun", f"+search={search}",
           f"hydra.sweep.dir={folder / 'sweep'}",
           f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", *overrides]
    peak = [0]
    with open(folder / "log.txt", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT)

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_pss(proc.pid))
                time.sleep(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        sampler.join()
    if code != 0:
        raise SystemExit(f"search failed ({code}): {shlex.join(cmd)}\n"
                         f"see {folder / 'log.txt'}")
    return {"wall": wall, "pss_gb": peak[0] / 2**30}


def trial_runs(folder: Path) -> list:
    """The search's finished child runs, each with the worker that ran it."""
    import mlflow
    import optuna

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(exps, max_results=1000)
            if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(folder / "optuna-journal.log")))
    worker = {}
    for summary in optuna.study.get_all_study_summaries(journal):
        stage = summary.study_name.rsplit(".", 1)[-1].removeprefix("stage")
        study = optuna.load_study(study_name=summary.study_name, storage=journal)
        for t in study.trials:
            worker[stage, str(t.number)] = t.user_attrs.get("worker")
    for r in runs:
        r.worker = worker.get((r.data.tags["stage"], r.data.tags["trial"]))
    return runs


def breakdown(runs: list, wall: float, workers: int) -> dict:
    """Core-seconds by kind over the workers' whole time, and the per-trial overhead."""
    metric = lambda key: sum(r.data.metrics.get(f"{key}_seconds", 0) for r in runs)  # noqa: E731
    steps, evals, tracking = metric("train"), metric("eval"), metric("tracking")
    gaps = []  # one trial's start to the same worker's next, less its steps and evaluation
    for w in {r.worker for r in runs}:
        own = sorted((r for r in runs if r.worker == w), key=lambda r: r.info.start_time)
        for a, b in zip(own, own[1:], strict=False):
            if a.data.tags["stage"] == b.data.tags["stage"]:  # not the wait at a stage's end
                gaps.append((b.info.start_time - a.info.start_time) / 1000
                            - a.data.metrics["train_seconds"] - a.data.metrics["eval_seconds"])
    return {"steps": steps, "eval": evals, "tracking": tracking,
            "other": workers * wall - steps - evals - tracking,
            "overhead": median(gaps) if gaps else float("nan")}


def bare_steps(folder: Path, runs: list) -> float:
    """Seconds of the update steps of the runs' configs, retrained here one after the
    other on one BLAS thread, untracked."""
    import mlflow
    from omegaconf import OmegaConf

    from mlplab.commands.train import prepare

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    total = 0.0
    for r in runs:
        path = client.download_artifacts(r.info.run_id, "config.yaml", str(folder))
        cfg = OmegaConf.load(path)
        cfg.train.threads, cfg.tracking.enabled, cfg.train.progress = 1, False, False
        _, _, _, train = prepare(cfg)
        total += train().train_seconds
    return total


def fill_data_cache(search: str, extra: list[str]) -> None:
    """Build the shared data cache of every setting the search trains in."""
    from hydra import compose, initialize_config_dir

    from mlplab.app import experiment
    from mlplab.commands.common import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"+search={search}", *extra], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        settings = [list(s.overrides) for s in sweeper.stages] or [[]]
        if sweeper.final is not None:
            settings.append(list(sweeper.final.overrides))
        for overrides in settings:
            experiment.build_dataset(compose("config", [f"+search={search}", *extra,
                                                        *overrides]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search", default="lambda_c2f", help="conf/search/NAME")
    parser.add_argument("--out", help="folder for the searches (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="overrides for every search (after --)")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be at least 1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = Path(args.out or tempfile.mkdtemp(prefix="mlplab-search-")).resolve()
    print(f"searches in {out}; +search={args.search} {shlex.join(args.extra)}", flush=True)
    fill_data_cache(args.search, args.extra)
    ratios, walls = [], []
    for r in range(args.rounds):
        folder = out / f"round{r}"
        result = run_search(folder, args.search, args.extra)
        answer = recorded(folder)
        runs = trial_runs(folder)
        workers = len({run.worker for run in runs})
        parts = breakdown(runs, result["wall"], workers)
        bare = bare_steps(folder, runs)
        ratios.append(result["wall"] / bare)
        walls.append(result["wall"])
        print(f"round {r}: wall {result['wall']:.1f} s, peak PSS {result['pss_gb']:.2f} GB, "
              f"{len(runs)} trials on {workers} workers; core-seconds: steps "
              f"{parts['steps']:.1f}, eval {parts['eval']:.1f}, tracking "
              f"{parts['tracking']:.1f}, other {parts['other']:.1f}; per-trial overhead "
              f"{parts['overhead']:.2f} s; bare steps on one core {bare:.1f} s; "
              f"wall / bare {ratios[-1]:.3f}; chose {answer['chose']}, final_test_acc "
              f"{answer['test']:.4f}", flush=True)
    print(f"median of {args.rounds}: wall {median(walls):.1f} s, wall / bare steps "
          f"{median(ratios):.3f} ({', '.join(f'{q:.3f}' for q in ratios)})")


if __name__ == "__main__":
    main()

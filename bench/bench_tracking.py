"""What tracking costs: the same commands timed with MLflow tracking on and off.

    python bench/bench_tracking.py [--repeats 5] [--data PATH --md5 MD5] [--skip-long]
                                   [--busy N] [--only TEXT]

Each case runs `python train.py ...` as a user would (a fresh process, in a folder
whose mlflow.db already exists: creating one costs ~1.2 s once, see the first line),
alternating tracked and `tracking.enabled=false` runs so that the machine's drift hits
both alike, and reports medians of whole-process wall time. The cost is
`tracked - untracked`, shown in seconds and as a share of the tracked run's time.
Cases: the README's main job (a short run: 1,000 steps on 10,000 images), four such
runs as one multirun (MLflow's import is paid once per process), and the reports'
3-layer BN setting (20 epochs on 45,000 images). `--busy N` keeps N CPU-bound
processes running beside every timed command (a machine shared with other work):
tracking must not stall there either; `tracked / untracked` says by how much it slows.

The data comes from --data (a local copy of the archive), else $MLPLAB_CIFAR10_URL,
else the official download; it is cached once before timing starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false"]
CASES = {  # name: train.py arguments
    "main job (model.layers=[50,50] bn=true)": ["model.layers=[50,50]", "bn=true"],
    "4 such runs in one multirun": ["--multirun", "model.layers=[50,50]", "bn=true",
                                    "lam=0.001,0.003,0.01,0.03"],
    "experiment=three_layer_bn (45k images, 20 epochs)": ["experiment=three_layer_bn"],
}


def timed_run(args: list[str], env: dict[str, str], tracked: bool, folder: str) -> float:
    command = [sys.executable, str(REPO / "train.py"), *args, *QUIET]
    if not tracked:
        command.append("tracking.enabled=false")
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", help="a local CIFAR-10 archive (default: the official one)")
    parser.add_argument("--md5", help="its MD5")
    parser.add_argument("--skip-long", action="store_true", help="leave out three_layer_bn")
    parser.add_argument("--busy", type=int, default=0,
                        help="CPU-bound processes to run beside the timed commands")
    parser.add_argument("--only", default="", help="only the cases whose name has this text")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.data:
        env |= {"MLPLAB_CIFAR10_URL": args.data, "MLPLAB_CIFAR10_MD5": args.md5 or ""}
    cases = {k: v for k, v in CASES.items()
             if not (args.skip_long and "three" in k) and args.only in k}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        run_cases(cases, env, args.repeats, args.busy)
    finally:
        for proc in busy:
            proc.kill()


def run_cases(cases: dict[str, list[str]], env: dict[str, str], repeats: int,
              busy: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        tiny = ["schedule.n_s=1", "data.split=all"]  # caches the data for every case
        timed_run([*tiny, "tracking.enabled=false"], env, False, folder)
        first = timed_run(tiny, env, True, folder)  # creates mlflow.db
        again = timed_run(tiny, env, True, folder)
        print(f"creating mlflow.db in a new folder: +{first - again:.2f} s, once\n")
        print(f"median of {repeats} alternating runs, whole `python train.py` processes, "
              f"{busy} CPU-bound process(es) beside them")
        print("| case | untracked s | tracked s | tracking costs s | share of tracked run "
              "| tracked / untracked |")
        print("|---|---|---|---|---|---|")
        for name, case in cases.items():
            times = {True: [], False: []}
            for _ in range(repeats):
                for tracked in (True, False):
                    times[tracked].append(timed_run(case, env, tracked, folder))
            on, off = statistics.median(times[True]), statistics.median(times[False])
            print(f"| {name} | {off:.2f} | {on:.2f} | {on - off:+.2f} | "
                  f"{(on - off) / on:.1%} | {on / off:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""The lambda search by 1 worker and by 2, against PostgreSQL and an MLflow server.

    python bench/bench_workers.py [--repeats 3] [--n-s 6]

Starts the servers as tests/test_servers.py does (a throwaway PostgreSQL cluster and
`mlflow server` on it, both on 127.0.0.1), then times the test's tiny search (3 + 2
trials and the final retrain on a tiny archive in the official format, `schedule.n_s`
steps per half-cycle) run by one worker, and by two started at once, alternating,
each time a fresh study: wall time from the start to the last worker's exit.
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
sys.path.insert(0, str(REPO))

from tests.conftest import write_cifar_archive  # noqa: E402
from tests.test_servers import mlflow_server, postgres, tiny_search  # noqa: E402


def search(n_workers: int, study: str, folder: Path, env: dict, archive, pg, n_s) -> float:
    overrides = [*tiny_search(archive, folder / "data", study),
                 f"hydra.sweeper.storage={pg.url('optuna')}", f"schedule.n_s={n_s}"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), "--multirun",
                               f"hydra.sweep.dir={folder / study / str(i)}", *overrides],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for i in range(n_workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-s", type=int, default=6, help="steps per half-cycle")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlplab-bench-") as tmp:
        folder = Path(tmp)
        archive = folder / "cifar-10-python.tar.gz"
        archive_md5 = write_cifar_archive(archive)
        with postgres() as pg, mlflow_server(pg, folder) as url:
            env = {**os.environ, "PGPASSWORD": pg.password, "MLFLOW_TRACKING_URI": url}
            times: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.repeats):
                for n in (1, 2):
                    seconds = search(n, f"bench{r}_{n}", folder, env,
                                     (str(archive), archive_md5), pg, args.n_s)
                    times[n].append(seconds)
                    print(f"repeat {r}: {n} worker(s) {seconds:.1f} s", flush=True)
    one, two = (statistics.median(times[n]) for n in (1, 2))
    print(f"median wall: 1 worker {one:.1f} s, 2 workers {two:.1f} s "
          f"({one / two:.2f}x), {args.repeats} repeats, n_s={args.n_s}")


if __name__ == "__main__":
    main()

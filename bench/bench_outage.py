"""A tracked run through an outage of its `mlflow server`: does it lose anything, and
does training slow down?

    python bench/bench_outage.py --outage 240 [--data PATH --md5 MD5] [--args ...]

Starts an `mlflow server` (SQLite store, artifacts served over HTTP) on 127.0.0.1, then
runs `python train.py ARGS tracking.uri=<server>` three times: without an outage,
with the server stopped `--stop-after` seconds after the run reached it and started
again `--outage` seconds later, and without an outage again (the two clean runs
bracket the machine's drift). The run with the outage waits for the server as long
as it takes (tracking.wait_seconds), so its record arrives without a sync. For each
run: exit status, status in the store, val_acc points, artifacts, model, and the time
from its first to its last update step (the train_loss points' timestamps, as the run
measured them). The goal: the outage run's span within 10% of the clean runs' median.

The default ARGS train the reports' 3-layer BN setting for 12 cycles (45,000 images;
74-85 s of training on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_servers import MlflowServer  # noqa: E402

DEFAULT_ARGS = ["experiment=three_layer_bn", "schedule.cycles=12", "train.progress=false"]


def named(client, name: str) -> list:
    """The runs called `name`, in any experiment."""
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"attributes.run_name = '{name}'") \
        if ids else []


def run(server: MlflowServer, args: list[str], env: dict, name: str, outage: float | None,
        stop_after: float) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(server.url)
    wait = (outage or 0) + 600
    command = [sys.executable, str(REPO / "train.py"), *args, f"tracking.uri={server.url}",
               f"tracking.run_name={name}", f"tracking.wait_seconds={wait}"]
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
        reader.start()
        if outage is not None:
            while not named(client, name):
                time.sleep(0.5)
            time.sleep(stop_after)
            server.stop()
            print(f"  {name}: server stopped for {outage:.0f} s", flush=True)
            time.sleep(outage)
            server.start()
            print(f"  {name}: server back", flush=True)
        code = proc.wait()
        reader.join()
    if code not in (0, 75):
        raise SystemExit(f"{name}: train.py exited {code}:\n{''.join(out[-20:])}")
    [found] = named(client, name)
    rid = found.info.run_id
    losses = client.get_metric_history(rid, "train_loss")
    models = client.search_logged_models([found.info.experiment_id],
                                         filter_string=f"source_run_id = '{rid}'")
    return {"exit": code, "status": found.info.status,
            "val_points": len(client.get_metric_history(rid, "val_acc")),
            "artifacts": sorted(a.path for a in client.list_artifacts(rid)),
            "models": [m.status.name for m in models],
            "span": (max(m.timestamp for m in losses) - min(m.timestamp for m in losses)) / 1000,
            "tail": "".join(out[-3:]).strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outage", type=float, default=240, help="seconds the server is down")
    p.add_argument("--stop-after", type=float, default=10,
                   help="seconds after the run reached the server that it stops")
    p.add_argument("--data", help="a local CIFAR-10 archive (default: $MLPLAB_CIFAR10_URL)")
    p.add_argument("--md5")
    p.add_argument("--args", nargs="*", default=DEFAULT_ARGS, help="train.py arguments")
    a = p.parse_args()
    env = dict(os.environ)
    if a.data:
        env |= {"MLPLAB_CIFAR10_URL": a.data, "MLPLAB_CIFAR10_MD5": a.md5 or ""}
    with tempfile.TemporaryDirectory() as folder:
        server = MlflowServer(Path(folder))
        server.start()
        try:
            results = {}
            for name, outage in (("clean-1", None), ("outage", a.outage), ("clean-2", None)):
                t0 = time.perf_counter()
                results[name] = run(server, a.args, env, name, outage, a.stop_after)
                print(f"{name}: {time.perf_counter() - t0:.0f} s wall, {results[name]}",
                      flush=True)
        finally:
            server.stop()
    clean = statistics.median([results["clean-1"]["span"], results["clean-2"]["span"]])
    print(f"\nfirst-to-last update step: clean {results['clean-1']['span']:.1f} s and "
          f"{results['clean-2']['span']:.1f} s, with a {a.outage:.0f} s outage "
          f"{results['outage']['span']:.1f} s: ratio {results['outage']['span'] / clean:.3f}")


if __name__ == "__main__":
    main()

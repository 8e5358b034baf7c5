"""Deliver the runs a store did not take to it: what a run or a sweep kept on disk
while the MLflow store was away (mlplab.app.spool, mlplab.app.courier).

    mlplab-sync outputs/2026-12-06/10-31-07      # a run's folder, as its last line said
    mlplab-sync multirun/                         # every sweep under it
    mlplab-sync . --tracking-uri http://mlflow.example:5000   # to another store

Each run goes to the store it was written for unless --tracking-uri names another.
Delivery is exactly once: a second sync adds nothing, and a sync killed half way is
finished by the next. A run still being written by a live process is left to it.
Exit status 0 when nothing is left to deliver, 75 when some runs still wait.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlplab.app import courier, store
from mlplab.commands.common import PENDING_EXIT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlplab-sync", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", default=["."], type=Path,
                   help="folders to search for kept runs (default: the current one)")
    p.add_argument("--tracking-uri", default=None,
                   help="deliver to this store instead of the one each run was written for")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"mlplab-sync: no such folder: {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    uri = store.resolve_uri(args.tracking_uri) if args.tracking_uri else None
    delivered, left, messages = courier.sync(args.folders, uri)
    for message in messages:
        print(f"mlplab-sync: {message}", file=sys.stderr)
    print(f"mlplab-sync: {delivered} runs delivered, {left} still waiting")
    if left:
        sys.exit(PENDING_EXIT)


if __name__ == "__main__":
    main()

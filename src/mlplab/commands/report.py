"""Rebuild the report of the published settings from the MLflow store.

    python -m mlplab.commands.report --experiment dd2424 --out report/
    mlplab-report --experiment dd2424 --out report/ --tracking-uri sqlite:///mlflow.db

The store is found as training finds it (--tracking-uri, else $MLFLOW_TRACKING_URI,
else sqlite:///mlflow.db in the current folder). Writes report/report.md and
report/figures/, then logs them as a run tagged mlplab.kind=report (unless --no-log).
"""

from __future__ import annotations

import argparse

from mlplab.app import report, store


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlplab-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="dd2424",
                   help="MLflow experiment holding the runs (default: %(default)s)")
    p.add_argument("--out", default="report", help="output folder (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--search-experiment", default=None,
                   help="experiment of the lambda search to plot (default: the newest "
                        "search in any experiment)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    uri = store.resolve_uri(args.tracking_uri)
    path = report.build_report(uri, args.experiment, args.out, args.search_experiment)
    print(f"mlplab: report written to {path}")
    if not args.no_log:
        run_id = report.log_report(uri, args.experiment, args.out)
        print(f"mlplab: report logged as run {run_id} in experiment {args.experiment!r}")


if __name__ == "__main__":
    main()

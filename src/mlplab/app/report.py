"""The report: published settings read back from MLflow as one Markdown page with figures.

Runs are grouped by their `setting` tag (every `conf/experiment/*.yaml` sets it to its
own name), then by configuration: the logged params without the seed and bookkeeping
keys (`BOOKKEEPING`). Only the runs of the published configuration are averaged: the
configuration of the newest run whose `hydra_overrides` tag overrides nothing beyond
`experiment=`, the seed and bookkeeping keys (`python train.py experiment=three_layer
train.seed=1`). Runs of other configurations (`experiment=three_layer lam=0.1`) are left
out of the table and listed under it. A setting's final train/val/test accuracies are
averaged over its published finished runs and set beside the reference test accuracy
its experiment file quotes (tag `reference_test_acc`). Figures are redrawn from the
metric histories of each setting's newest published run; the lambda figure comes from
the newest sweep (a parent run tagged `mlplab.sweep=true` with a `trials.csv` artifact).

`build_report(uri, experiment, out)` writes `out/report.md` and `out/figures/`;
`log_report` records them as an MLflow run tagged `mlplab.kind=report`. Child runs
(sweep trials), sweep parents and earlier reports are never counted as settings.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient

from mlplab.app import plots
from mlplab.app.passwords import mask_password
from mlplab.app.report_runs import (
    KIND_TAG,
    SETTING_TAG,
    SWEEP_TAG,
    TRIALS_ARTIFACT,
    Setting,
    find_search,
    load_history,
    load_settings,
)

ACCURACIES = (("train", "final_train_acc"), ("val", "final_val_acc"), ("test", "test_acc"))
FIGURES_DIR = "figures"
REPORT_FILE = "report.md"
REPORT_WAIT_SECONDS = 120  # for the store to take the report's run


@dataclass(frozen=True)
class SideBySide:
    """A figure of settings in columns, one row per curve."""

    name: str
    title: str
    settings: tuple[str, ...]
    curves: tuple[tuple[str, str], ...] = (("loss", "loss"), ("acc", "accuracy"))


@dataclass(frozen=True)
class Grid:
    """A figure of settings in a grid: cells maps (row label, column label) -> setting."""

    name: str
    title: str
    cells: dict[tuple[str, str], str]
    curve: tuple[str, str] = ("loss", "loss")

    @property
    def settings(self) -> tuple[str, ...]:
        return tuple(self.cells.values())


ONE_LAYER = ("one_layer_lam0_eta0.1", "one_layer_lam0_eta0.001", "one_layer_lam0.1_eta0.001",
             "one_layer_lam1_eta0.001")
INIT_STDS = ("1e-1", "1e-3", "1e-4")
FIGURES = (
    SideBySide("one_layer", "1-layer softmax: lambda and eta", ONE_LAYER,
               (("cost", "cost"), ("acc", "accuracy"))),
    SideBySide("two_layer", "2-layer [50], cyclical learning rate",
               ("two_layer_one_cycle", "two_layer_three_cycles", "two_layer_searched")),
    SideBySide("three_layer_bn", "3-layer [50, 50]: without vs with batch normalisation",
               ("three_layer", "three_layer_bn")),
    SideBySide("nine_layer_bn", "9-layer: without vs with batch normalisation",
               ("nine_layer", "nine_layer_bn")),
    Grid("init_sensitivity", "3-layer, weights N(0, std^2): without vs with batch "
         "normalisation", {(f"std {s}", col): f"init_std{s}{suffix}" for s in INIT_STDS
                           for col, suffix in (("no BN", ""), ("BN", "_bn"))}),
    # beyond the reports: nothing published to pair it with, so a figure of its own,
    # with the cost as well (the L2 term of its 4.2M weights is not negligible)
    SideBySide("best_mlp", "Beyond the reports: best_mlp", ("best_mlp",),
               (("loss", "loss"), ("cost", "cost"), ("acc", "accuracy"))),
)
# Table order: settings in the order the figures show them, then any others by name.
KNOWN_ORDER = tuple(s for fig in FIGURES for s in fig.settings)


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _table(settings: dict[str, Setting]) -> list[str]:
    lines = ["| setting | model and schedule | lambda | runs | train | val | test "
             "| reference test | test − reference |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in settings.values():
        if not s.finished and not s.failed:
            continue  # only variants: listed under the table
        ref = s.reference
        if s.finished:
            accs = [_pct(*s.accuracy(metric)) for _, metric in ACCURACIES]
            test = s.accuracy("test_acc")[0]
            diff = f"{100 * (test - ref):+.1f}" if ref is not None and test is not None else ""
            runs = str(len(s.finished)) + (f" (+{len(s.failed)} failed)" if s.failed else "")
        else:  # say why rather than drop the row: a diverged setting is a result too
            failure = s.failed[0].data.tags.get("failure", "failed").split(" (")[0]
            accs, diff, runs = [failure, "", ""], "", f"0 of {len(s.failed)}"
        cells = [f"`{s.name}`", s.summary, s.lam, runs, *accs, _pct(ref), diff]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _variants(settings: dict[str, Setting]) -> list[str]:
    """The runs left out of the table, by setting and configuration."""
    lines = [f"- `{s.name}`: {v.runs} run{'s' if v.runs > 1 else ''} with `{v.difference}`"
             for s in settings.values() for v in s.variants]
    if not lines:
        return []
    n = sum(v.runs for s in settings.values() for v in s.variants)
    return [f"Left out: {n} run{'s' if n > 1 else ''} tagged with a setting but trained in "
            "another configuration than the published one (overrides beyond "
            "`experiment=` and the seed), so not repeats of it:", "", *lines, ""]


def _draw(fig, settings: dict[str, Setting], client: MlflowClient, path: Path) -> bool:
    """Draw one comparison figure from the newest run of each of its settings that has
    one; False (nothing drawn) when none has."""
    history = {name: load_history(client, settings[name].newest.info.run_id)
               for name in fig.settings if name in settings and settings[name].newest}
    history = {k: v for k, v in history.items() if v}
    if not history:
        return False
    if isinstance(fig, Grid):
        cells = {cell: history[name] for cell, name in fig.cells.items() if name in history}
        plots.plot_curve_grid(cells, path, fig.title, fig.curve)
    else:
        plots.plot_side_by_side(history, path, fig.title, fig.curves)
    return True


def _class_templates(client: MlflowClient, settings: dict[str, Setting], figures: Path):
    """Copy the class-template images of the 1-layer runs: [(setting, file name)]."""
    found = []
    for name, s in settings.items():
        run = s.newest
        if run is None or not name.startswith("one_layer"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                src = Path(client.download_artifacts(run.info.run_id,
                                                     "class_templates.png", tmp))
            except Exception:  # no such artifact
                continue
            dest = figures / f"class_templates_{name}.png"
            dest.write_bytes(src.read_bytes())
        found.append((name, dest.name))
    return found


def build_report(uri: str, experiment: str, out, search_experiment: str | None = None
                 ) -> Path:
    """Write `out/report.md` and its figures under `out/figures/`; return the .md path.

    A missing experiment, setting or sweep is said in the report, not raised.
    """
    client = MlflowClient(uri)
    out = Path(out)
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    exp = client.get_experiment_by_name(experiment)
    settings = load_settings(client, exp.experiment_id, KNOWN_ORDER) if exp else {}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# mlplab report: experiment `{experiment}`", "",
          f"Generated {now} from `{uri}`.", ""]
    if not any(s.finished or s.failed for s in settings.values()):
        md += [f"No finished runs with a `{SETTING_TAG}` tag in experiment `{experiment}`. "
               f"Run some first, e.g. `python train.py experiment=three_layer_bn`.", "",
               *_variants(settings)]
    else:
        n_runs = sum(len(s.finished) for s in settings.values())
        md += ["## Final accuracy per setting", "",
               f"Accuracy in %: mean over each setting's finished runs in its published "
               f"configuration ({n_runs} in all), ± the standard deviation when there are "
               "several. The reference is the test accuracy quoted in the setting's "
               "`conf/experiment` file. Reproduce a row with "
               "`python train.py experiment=<setting> train.seed=<seed>`.", "",
               *_table(settings), "", *_variants(settings)]
        md += ["## Figures", "",
               "Curves of each setting's newest run in its published configuration: "
               "training solid, validation dashed.", ""]
        for fig in FIGURES:
            path = figures / f"{fig.name}.png"
            if _draw(fig, settings, client, path):
                md += [f"### {fig.title}", "", f"![{fig.title}]({FIGURES_DIR}/{path.name})", ""]
        templates = _class_templates(client, settings, figures)
        if templates:
            md += ["### Class templates of the 1-layer W", ""]
            for name, file in templates:
                md += [f"`{name}`", "", f"![class templates, {name}]({FIGURES_DIR}/{file})", ""]
    md += _search_section(client, search_experiment, figures)
    path = out / REPORT_FILE
    path.write_text("\n".join(md))
    return path


def _search_section(client: MlflowClient, experiment: str | None, figures: Path) -> list[str]:
    where = f"experiment `{experiment}`" if experiment else "any experiment"
    md = ["## Accuracy vs lambda from a search", ""]
    search = find_search(client, experiment)
    if search is None:
        return md + [f"No search found in {where} (a parent run tagged `{SWEEP_TAG}=true` "
                     f"with a `{TRIALS_ARTIFACT}` artifact). Run one, e.g. "
                     "`python train.py --multirun +search=lambda_c2f`.", ""]
    run_id = search.run.info.run_id
    md.append(f"Sweep run `{run_id}` in experiment `{search.experiment}`: "
              f"{len(search.trials)} completed trials.")
    if search.trials:
        best = max(search.trials, key=lambda t: t["value"])
        md[-1] += (f" Best: {search.param} = {best[search.param]:.3g} with validation "
                   f"accuracy {_pct(best['value'])}% (stage {best['stage']}, trial "
                   f"{best['number']}).")
        path = figures / "lambda_search.png"
        plots.plot_search(search.trials, search.param, path,
                          f"validation accuracy vs {search.param}")
        md += ["", f"![accuracy vs {search.param}]({FIGURES_DIR}/{path.name})"]
    if search.final:
        test = search.run.data.metrics.get("final_test_acc")
        seeds = search.final.get("seeds", 1)
        md += ["", f"Final retrain: {search.param} = {search.final[search.param]:.3g}, "
               f"validation accuracy {_pct(search.final['value'])}%"
               + (f", test accuracy {_pct(test)}%" if test is not None else "")
               + (f" (means over {seeds} seeds)." if seeds > 1 else ".")]
    return md + [""]


def log_report(uri: str, experiment: str, out) -> str:
    """Record the report (markdown and figures) as a run tagged mlplab.kind=report in
    `experiment`; returns its run id."""
    from mlplab.app import store, tracking

    out = Path(out)
    # the store answered the report's reads a moment ago: waiting for it is short
    with tracking.run(uri=uri, experiment=experiment, run_name="report", spool_root=out,
                      tags={KIND_TAG: "report"}, wait_seconds=REPORT_WAIT_SECONDS) as run:
        run.log_artifact(out / REPORT_FILE)
        for png in sorted((out / FIGURES_DIR).glob("*.png")):
            run.log_artifact(png, FIGURES_DIR)
    if run.pending:
        raise store.TrackingError(
            f"the report run is not in {mask_password(uri)} yet: its {run.pending} "
            f"records are kept in {out}; deliver them with: mlplab-sync {out}")
    return run.run_id

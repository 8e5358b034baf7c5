"""The runs a report reads back from MLflow: settings grouped by tag and split into
their published configuration and its variants, metric histories, the newest sweep."""

from __future__ import annotations

import csv
import statistics
import tempfile
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Run

SETTING_TAG = "setting"
REFERENCE_TAG = "reference_test_acc"
KIND_TAG = "mlplab.kind"
SWEEP_TAG = "mlplab.sweep"
PARENT_TAG = "mlflow.parentRunId"
TRIALS_ARTIFACT = "trials.csv"
FINAL_STAGE = "final"  # the sweep's retrain of its best trial, a row of trials.csv
CHOOSE_STAGE = "choose"  # its candidates' retrains with other seeds: not search points
# trials.csv's columns that are not searched parameters (train.seed: the final's seeds;
# value_<objective>: a search of several objectives)
TRIALS_COLUMNS = ("stage", "number", "state", "value", "test_acc", "pruned_at", "train.seed")
HISTORY_KEYS = tuple(f"{split}_{key}" for split in ("train", "val")
                     for key in ("loss", "cost", "acc"))
OVERRIDES_TAG = "hydra_overrides"
# Params that say how a run was seeded, shown, tracked or where its files live, not
# what was trained: runs differing only in these are repeats of one configuration.
BOOKKEEPING = ("train.seed", "train.progress", "data.url", "data.root", "tracking.", "trial.",
               "tags.", "gradcheck.",
               # how a run measured and on how many cores, not what it trained
               "train.threads", "threads.", "train.eval_train_rows")
PUBLISHED_OVERRIDES = ("experiment",)  # with BOOKKEEPING: what a published run may override


def _is_bookkeeping(key: str) -> bool:
    return any(key == b or (b.endswith(".") and key.startswith(b)) for b in BOOKKEEPING)


def configuration(run: Run) -> dict[str, str]:
    """The params that decide what a run trains: all but the seed and bookkeeping."""
    return {k: v for k, v in run.data.params.items() if not _is_bookkeeping(k)}


def extra_overrides(run: Run) -> list[str] | None:
    """The command-line overrides of a run beyond `experiment=`, the seed and bookkeeping
    keys; None when the run has no `hydra_overrides` tag (composed in code)."""
    tag = run.data.tags.get(OVERRIDES_TAG)
    if tag is None:
        return None
    extra = []
    for override in tag.split():
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in PUBLISHED_OVERRIDES and not _is_bookkeeping(key):
            extra.append(override)
    return extra


@dataclass
class Variant:
    """Runs of a setting in another configuration than the published one."""

    runs: int
    difference: str  # e.g. "lam=0.1", against the published configuration


@dataclass
class Setting:
    """The runs of one setting in its published configuration, newest first, and the
    other configurations its tag was also used with."""

    name: str
    finished: list[Run] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)

    @property
    def newest(self) -> Run | None:
        return self.finished[0] if self.finished else None

    @property
    def reference(self) -> float | None:
        for run in self.finished + self.failed:
            if run.data.tags.get(REFERENCE_TAG):
                return float(run.data.tags[REFERENCE_TAG])
        return None

    @property
    def summary(self) -> str:
        run = self.newest or self.failed[0]
        return run.data.tags.get("mlplab.summary", "")

    @property
    def lam(self) -> str:
        run = self.newest or self.failed[0]
        return run.data.params.get("lam", "")

    def accuracy(self, metric: str) -> tuple[float, float | None]:
        """(mean, sample std or None for a single run) of a final metric over the
        finished runs."""
        values = [r.data.metrics[metric] for r in self.finished if metric in r.data.metrics]
        if len(values) < 2:
            return (values[0] if values else None), None
        return statistics.fmean(values), statistics.stdev(values)


@dataclass
class Search:
    """The newest sweep's completed search trials: [{"stage", "number", "value", param}],
    and its final retrain (the best value retrained on more data), if it has one."""

    run: Run
    experiment: str
    param: str
    trials: list[dict]
    final: dict | None = None


def _all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = ""):
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        yield from page
        token = page.token
        if not token:
            return


def _difference(config: dict[str, str], published: dict[str, str]) -> str:
    return " ".join(f"{k}={config.get(k, '(unset)')}" for k in sorted(config | published)
                    if config.get(k) != published.get(k))


def split_setting(name: str, runs: list[Run]) -> Setting:
    """The runs of one setting (newest first) split by configuration. The published one
    is that of the newest run overriding nothing beyond `experiment=`, the seed and
    bookkeeping keys; failing any, of the newest run without an overrides tag; failing
    that, there is none and every run is a variant."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(sorted(configuration(run).items())), []).append(run)
    clean = [r for r in runs if extra_overrides(r) == []]
    untagged = [r for r in runs if extra_overrides(r) is None]
    reference = (clean or untagged or [None])[0]
    published = dict(configuration(reference)) if reference else {}
    setting = Setting(name)
    for config, group in groups.items():
        if reference is not None and dict(config) == published:
            setting.finished = [r for r in group if r.info.status == "FINISHED"]
            setting.failed = [r for r in group if r.info.status == "FAILED"]
        elif reference is not None:
            setting.variants.append(Variant(len(group), _difference(dict(config), published)))
        else:  # nothing to compare with: say what the runs overrode
            overrides = extra_overrides(group[0])
            setting.variants.append(Variant(len(group), " ".join(overrides or ["?"])))
    return setting


def load_settings(client: MlflowClient, experiment_id: str,
                  known_order: tuple[str, ...] = ()) -> dict[str, Setting]:
    """Finished and failed runs of an experiment grouped by setting tag, newest first,
    each split into its published configuration and the variants."""
    runs: dict[str, list[Run]] = {}
    for run in _all_runs(client, [experiment_id]):
        tags = run.data.tags
        name = tags.get(SETTING_TAG)
        if not name or PARENT_TAG in tags or KIND_TAG in tags or SWEEP_TAG in tags:
            continue
        if run.info.status in ("FINISHED", "FAILED"):
            runs.setdefault(name, []).append(run)
    settings = {name: split_setting(name, group) for name, group in runs.items()}
    order = {name: i for i, name in enumerate(known_order)}
    return dict(sorted(settings.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def load_history(client: MlflowClient, run_id: str) -> list[dict]:
    """The evaluation points of a run: [{"step": s, "train_loss": ..., ...}] by step."""
    by_step: dict[int, dict] = {}
    for key in HISTORY_KEYS:
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"step": m.step})[key] = m.value
    return [by_step[s] for s in sorted(by_step) if len(by_step[s]) == len(HISTORY_KEYS) + 1]


def find_search(client: MlflowClient, experiment: str | None = None) -> Search | None:
    """The newest sweep parent run (in `experiment`, or in any) that has trials.csv."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        experiments = [exp] if exp else []
    else:
        experiments = list(client.search_experiments())
    if not experiments:
        return None
    names = {e.experiment_id: e.name for e in experiments}
    for run in _all_runs(client, list(names), f"tags.`{SWEEP_TAG}` = 'true'"):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, TRIALS_ARTIFACT, tmp)
            except Exception:  # MLflow raises its own types for a missing artifact
                continue
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        params = [c for c in (rows[0] if rows else {}) if c not in TRIALS_COLUMNS
                  and not c.startswith("value_")]  # further objectives' values
        if not params:
            continue
        param = "lam" if "lam" in params else params[0]
        trials = [{"stage": r["stage"], "number": int(r["number"]),
                   "value": float(r["value"]), param: float(r[param])}
                  for r in rows if r["state"] == "COMPLETE"
                  and r["value"] not in ("", "nan") and r[param] != ""]
        # the final retrain validates on other rows: not comparable with the stages
        final = next((t for t in trials if t["stage"] == FINAL_STAGE), None)
        trials = [t for t in trials if t["stage"] not in (FINAL_STAGE, CHOOSE_STAGE)]
        chosen = run.data.tags.get(f"best.{param}")
        if final is not None and chosen is not None:  # the chosen candidate's seeds' mean
            final = {param: float(chosen), "value": run.data.metrics["final_val_acc"],
                     "seeds": int(run.data.metrics.get("final_seeds", 1))}
        return Search(run, names[run.info.experiment_id], param, trials, final)
    return None

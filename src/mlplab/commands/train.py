"""The training command: compose conf/, train, track in MLflow, print a summary.

    python train.py model.layers=[50,50] bn=true      # or: mlplab-train ...

`run_experiment(cfg)` is the same without the command line (tests, notebooks, the
sweeper). Its outcome (final accuracies, whether it was pruned) is what a multirun job
returns to the sweeper, which optimises the final validation accuracy.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlplab import trial
from mlplab.app import experiment, passwords, store, tracking
from mlplab.app.config import ConfigError
from mlplab.commands.common import (
    CONF_DIR,
    PENDING_EXIT,
    exit_with,
    in_multirun,
    pending_line,
    run_tags,
    terminate_as_interrupt,
    tracked_run,
)
from mlplab.engine import data, network, threads, trainer
from mlplab.engine.data import DataError, Dataset

EXAMPLE_ROWS = 2  # raw test images logged as the model's input example
PRUNED = "pruned"  # tag of a run its sweep stopped early: the update step it stopped at


@dataclass
class Outcome(trial.Outcome):
    """What one run produced (final metrics, whether it was pruned: the sweep's side,
    mlplab.trial), its timing, and where it was recorded."""

    run_id: str | None = None  # None: not tracked (tracking.enabled=false), or not yet
    tracking_uri: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    runs_page: str | None = None  # the experiment's runs in the MLflow UI
    pending: int = 0  # records the store did not have when the run ended
    spool: str | None = None  # where they are kept (mlplab-sync delivers them)

    @property
    def val_acc(self) -> float:
        return self.final["val_acc"]


def run_experiment(cfg: DictConfig) -> Outcome:
    """Validate, load, train and track one run. Raises ConfigError or DataError before
    anything is recorded; trainer.Diverged after marking the run FAILED;
    store.TrackingError if the run could not be recorded."""
    t_start = time.perf_counter()
    ds, net, summary, train = prepare(cfg)
    stop_early = _trial_reporter(cfg)
    t_cfg = cfg.tracking
    if not t_cfg.enabled:
        result = train(on_eval=stop_early)
        return Outcome(result.final | {"n_params": net.n_params},
                       pruned_at=result.steps if result.stopped else None,
                       seconds=_seconds(result, 0.0, t_start))

    uri = store.resolve_uri(t_cfg.uri)
    # the config's tags from the start: a sweep finds a killed trial's run by them
    with tracked_run(cfg, t_cfg.run_name or experiment.run_name(cfg, net),
                     dict(cfg.tags)) as run:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run.log_params(tracking.flatten(resolved))
        run.set_tags(run_tags(cfg, summary, ds.fingerprint))
        run.log_datasets(ds)

        def on_eval(rec: dict) -> bool:
            run.log_metrics({k: v for k, v in rec.items() if k not in ("step", "epoch")},
                            rec["step"])
            return stop_early is not None and stop_early(rec)

        result = train(on_eval=on_eval)
        run.log_params({f"threads.{phase}": str(n) for phase, n in result.extra["threads"].items()})
        final = result.final | {"n_params": net.n_params}  # a second objective to search
        run.log_metrics({"final_train_acc": final["train_acc"],
                         "final_val_acc": final["val_acc"], "test_acc": final["test_acc"],
                         "test_loss": final["test_loss"], "n_params": final["n_params"]},
                        step=result.steps)
        if result.stopped:  # the runs list says so, beside its name
            run.set_tags({PRUNED: str(result.steps), "mlflow.runName":
                          f"{t_cfg.run_name or experiment.run_name(cfg, net)} PRUNED"})
        _log_outputs(run, resolved, net, ds, result, summary,
                     t_cfg.log_model and not result.stopped, t_cfg.log_plots)
        seconds = _seconds(result, run.seconds, t_start)
        run.log_metrics({f"{k}_seconds": v for k, v in seconds.items()}, step=result.steps)
    seconds["tracking"] = run.seconds  # closing the run is on the clock too
    seconds["wall"] = time.perf_counter() - t_start
    return Outcome(final, pruned_at=result.steps if result.stopped else None,
                   run_id=run.run_id, tracking_uri=uri, seconds=seconds,
                   runs_page=store.runs_page(uri, run.experiment_id)
                   if run.experiment_id else None,
                   pending=run.pending, spool=str(run.spool.folder) if run.pending else None)


def prepare(cfg: DictConfig):
    """Validate and build one run: its dataset, network, summary line and the training
    call, `train(on_eval=...) -> trainer.Result`. Raises ConfigError or DataError."""
    experiment.validate(cfg)
    ds = experiment.build_dataset(cfg)
    schedule = experiment.build_schedule(cfg, len(ds.y_train))
    init_seed, shuffle_seed = np.random.SeedSequence(cfg.train.seed).spawn(2)
    net = experiment.build_network(cfg, ds, np.random.default_rng(init_seed))
    train = functools.partial(
        trainer.train, net, ds, schedule, lam=cfg.lam, batch_size=cfg.train.batch_size,
        rng=np.random.default_rng(shuffle_seed), evals_per_cycle=cfg.train.evals_per_cycle,
        optimizer=experiment.build_optimizer(cfg),
        augment=experiment.build_augment(cfg, ds.image_shape),
        label_smoothing=cfg.train.label_smoothing, eval_train_rows=cfg.train.eval_train_rows,
        threads=cfg.train.threads or threads.default_threads(), progress=cfg.train.progress)
    return ds, net, experiment.describe(net, schedule), train


def _trial_reporter(cfg: DictConfig):
    """For a trial of a sweep that prunes: the callback that reports each evaluation's
    validation accuracy (mlplab.trial) and says when to stop; else None. Step 0 is not
    reported: an untrained net says nothing about the trial's settings."""
    report = trial.reporter(cfg.trial)
    if report is None:
        return None
    return lambda rec: rec["step"] > 0 and report(rec["val_acc"], rec["step"])


def _seconds(result: trainer.Result, tracking_seconds: float, t_start: float) -> dict:
    return {"train": result.train_seconds, "eval": result.eval_seconds,
            "tracking": tracking_seconds, "wall": time.perf_counter() - t_start}


def _log_outputs(run, resolved: dict, net: network.Network, ds: Dataset,
                 result: trainer.Result, summary: str, log_model: bool,
                 log_plots: bool) -> None:
    """The config; with `log_plots` the curves figure and the class templates of a
    1-layer W (drawing them is a tenth of a second: a sweep's trials skip them); with
    `log_model` the network as a pyfunc model that takes raw images."""
    from mlplab.app import plots

    with tempfile.TemporaryDirectory(prefix="mlplab-run-") as tmp:
        folder = Path(tmp)
        # (an interpolated URL, e.g. from $MLPLAB_CIFAR10_URL, may hold a password)
        (folder / "config.yaml").write_text(passwords.mask_password(OmegaConf.to_yaml(resolved)))
        artifacts = [folder / "config.yaml"]
        if log_plots:
            plots.plot_curves(result.history, folder / "curves.png", title=summary)
            artifacts.append(folder / "curves.png")
        if log_plots and net.n_layers == 1:
            plots.plot_class_templates(net.params["W1"], ds.image_shape, ds.class_names,
                                       folder / "class_templates.png")
            artifacts.append(folder / "class_templates.png")
        for path in artifacts:
            run.log_artifact(path)
        if log_model:
            weights, examples = folder / "network.npz", folder / "input_example.npy"
            network.save(net, weights, mean=ds.mean, std=ds.std)
            np.save(examples, data.rows_to_images(_raw_examples(ds, EXAMPLE_ROWS),
                                                  ds.image_shape))
            run.log_model(weights, examples)


def _raw_examples(ds: Dataset, n: int) -> np.ndarray:
    """The first n test rows undone back to uint8 pixels, as a user would pass them."""
    rows = ds.X_test[:n].astype(np.float64) * ds.std + ds.mean
    return np.clip(np.rint(rows), 0, 255).astype(np.uint8)


def print_summary(outcome: Outcome, cfg: DictConfig) -> None:
    f, s = outcome.final, outcome.seconds
    share = 100 * s["tracking"] / s["wall"] if s["wall"] else 0.0
    where = (f"mlplab run {outcome.run_id or '(not in the store yet)'} (experiment "
             f"{cfg.tracking.experiment!r})" if outcome.tracking_uri
             else "mlplab run, not tracked (tracking.enabled=false)")
    print(
        f"\n{where}\n"
        f"  accuracy  train {f['train_acc']:.4f}   val {f['val_acc']:.4f}   "
        f"test {f['test_acc']:.4f}\n"
        f"  cost      train {f['train_cost']:.4f}   val {f['val_cost']:.4f}\n"
        f"  seconds   train {s['train']:.1f}   eval {s['eval']:.1f}   "
        f"tracking {s['tracking']:.2f} ({share:.1f}% of {s['wall']:.1f})"
    )
    if outcome.pruned_at is not None:
        print(f"  pruned    at update step {outcome.pruned_at}: its sweep stopped it early")
    if outcome.pending:
        print(f"  pending   {outcome.pending} records wait for the store in {outcome.spool}")
    if outcome.run_id:
        if not outcome.tracking_uri.startswith(("http://", "https://")):
            print("  browse    mlflow ui --backend-store-uri "
                  + passwords.mask_password(outcome.tracking_uri))
        if outcome.runs_page:
            print(f"  runs      {passwords.mask_password(outcome.runs_page)}")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Outcome:
    """Hydra entry point; returns the run's Outcome (a sweep's trial result). In a
    multirun a diverged trial returns an Outcome with its `failure` (recorded as failed
    by the sweeper) instead of stopping the sweep; a single run exits non-zero."""
    multirun = in_multirun()
    try:
        with terminate_as_interrupt():
            outcome = run_experiment(cfg)
    except (ConfigError, DataError) as err:
        if multirun:
            raise
        exit_with(f"error: {err}", 2)
    except trainer.Diverged as err:
        if multirun:
            print(f"mlplab: run FAILED: {err}", file=sys.stderr)
            return Outcome.failed(f"diverged: {err}")
        exit_with(f"run FAILED: {err}", 1)
    except store.TrackingError as err:
        if multirun:
            raise
        exit_with(f"tracking failed: {err}", 1)
    print_summary(outcome, cfg)
    if outcome.pending and not multirun:  # a sweep says so once, at its end
        exit_with(pending_line(outcome.pending, Path(outcome.spool).parent.parent,
                               outcome.tracking_uri), PENDING_EXIT)
    return outcome


if __name__ == "__main__":
    main()

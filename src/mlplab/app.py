"""The training command: compose conf/, train, track in MLflow, print a summary.

`python train.py model.layers=[50,50] bn=true` runs `main`; `run_experiment(cfg)` is
the same without the command line (tests, notebooks, the sweeper). Its return value,
the final validation accuracy, is what sweeps optimise.
"""

from __future__ import annotations

import functools
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlplab import config, data, network, recorder, schedules, tracking, trainer, writer
from mlplab.config import ConfigError
from mlplab.data import DataError, Dataset

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
config.register()


@dataclass
class Outcome:
    """What one run produced: final metrics, timing, and where it was recorded."""

    final: dict[str, float]
    run_id: str | None  # None: not tracked (tracking.enabled=false)
    tracking_uri: str | None
    seconds: dict[str, float]

    @property
    def val_acc(self) -> float:
        return self.final["val_acc"]


def build_dataset(cfg: DictConfig) -> Dataset:
    d = cfg.data
    return _load_dataset_cached(d.name, d.split, d.n_val, d.n_train, d.url, d.md5, d.root,
                                cfg.train.dtype)


@functools.lru_cache(maxsize=1)
def _load_dataset_cached(name, split, n_val, n_train, url, md5, root, dtype) -> Dataset:
    """The last dataset stays loaded: sweep trials in one process (Hydra's basic
    launcher, a joblib worker) share it instead of re-reading ~0.7 GB each. Nothing
    writes to a Dataset's arrays, so sharing is safe."""
    return data.load_dataset(name, split=split, n_val=n_val, n_train=n_train, url=url,
                             md5=md5, root=root, dtype=np.dtype(dtype))


def build_schedule(cfg: DictConfig, n_train: int):
    s, bs = cfg.schedule, cfg.train.batch_size
    if bs > n_train:
        raise ConfigError(f"train.batch_size={bs} is larger than the {n_train} training "
                          "rows: allowed 1.." + str(n_train))
    if s.name == "constant":
        return schedules.Constant(s.eta, s.epochs)
    n_s = schedules.half_cycle(s.n_s, s.n_s_k, n_train, bs)
    return schedules.Cyclical(s.eta_min, s.eta_max, n_s, s.cycles)


def build_network(cfg: DictConfig, ds: Dataset, rng) -> network.Network:
    m = cfg.model
    return network.init_network(ds.X_train.shape[1], list(m.layers), ds.n_classes, bn=cfg.bn,
                                init=m.init, init_std=m.init_std, bn_momentum=m.bn_momentum,
                                rng=rng, dtype=np.dtype(cfg.train.dtype))


def describe(net: network.Network, schedule) -> str:
    if isinstance(schedule, schedules.Cyclical):
        sched = (f"CLR {schedule.eta_min:g}..{schedule.eta_max:g}, n_s={schedule.n_s}, "
                 f"{schedule.cycles} cycle(s)")
    else:
        sched = f"constant eta={schedule.eta:g}, {schedule.epochs} epochs"
    return f"{net.arch}, {sched}"


def hydra_overrides() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return " ".join(HydraConfig.get().overrides.task)
    except ValueError:  # composed without the command line (tests, notebooks)
        return None


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_tags(cfg: DictConfig, summary: str, data_fingerprint: str) -> dict[str, str]:
    """The tags every mlplab run carries beside its git commit: what ran, on which data
    and from which command line, plus the config's own `tags`."""
    return {"mlplab.summary": summary, "data_fingerprint": data_fingerprint,
            "hydra_overrides": hydra_overrides(), **cfg.tags}


def run_experiment(cfg: DictConfig, wait: bool = True) -> Outcome:
    """Validate, load, train and track one run. Raises ConfigError or DataError before
    anything is recorded; trainer.Diverged after marking the run FAILED;
    writer.TrackingError if the run could not be recorded.

    MLflow's work happens in the tracking writer process (`mlplab.writer`). With
    `wait` the run is complete in the store when this returns; without (a multirun's
    trials) the writer finishes its figure and model while the caller goes on, and
    `writer.flush()` waits for it.
    """
    t_start = time.perf_counter()
    config.validate(cfg)
    t_cfg = cfg.tracking
    if t_cfg.enabled:
        writer.start()  # importing MLflow overlaps loading the data
    else:
        writer.flush()  # nothing of a tracked trial before may run beside training
        writer.stop_if_unused()  # train.py starts one early; it would slow training
    ds = build_dataset(cfg)
    schedule = build_schedule(cfg, len(ds.y_train))
    init_seed, shuffle_seed = np.random.SeedSequence(cfg.train.seed).spawn(2)
    net = build_network(cfg, ds, np.random.default_rng(init_seed))
    summary = describe(net, schedule)
    train = functools.partial(
        trainer.train, net, ds, schedule, lam=cfg.lam, batch_size=cfg.train.batch_size,
        rng=np.random.default_rng(shuffle_seed), evals_per_cycle=cfg.train.evals_per_cycle,
        progress=cfg.train.progress)
    if not t_cfg.enabled:
        result = train()
        return Outcome(result.final, None, None, _seconds(result, 0.0, t_start))

    uri = tracking.resolve_uri(t_cfg.uri)
    run = writer.RemoteRun(uri=uri, experiment=t_cfg.experiment, run_name=t_cfg.run_name,
                           parent_run_id=t_cfg.parent_run_id)
    try:  # from here on, whatever happens, the run is closed with a status
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run.log_params(tracking.flatten(resolved))
        run.set_tags(run_tags(cfg, summary, ds.fingerprint))
        run.log_datasets(tracking.dataset_spec(ds))
        run.sync()  # see mlplab.writer: the writer's start-up is best done before training
        result = train(on_eval=lambda rec: run.log_metrics(
            {k: v for k, v in rec.items() if k not in ("step", "epoch")}, rec["step"]),
            on_progress=lambda step: run.check())
        final = result.final
        run.log_metrics({"final_train_acc": final["train_acc"],
                         "final_val_acc": final["val_acc"], "test_acc": final["test_acc"],
                         "test_loss": final["test_loss"]}, step=result.steps)
        _log_outputs(run, resolved, net, ds, result, summary, t_cfg.log_model)
        if wait:
            run.sync()  # the figure and the model are on the clock
    except trainer.Diverged as err:
        _end_after_error(run, "FAILED", str(err))
        raise
    except writer.TrackingError:
        _end_after_error(run, "FAILED", report=False)
        raise
    except KeyboardInterrupt:
        _end_after_error(run, "KILLED")
        raise
    except BaseException:
        _end_after_error(run, "FAILED")
        raise
    seconds = _seconds(result, run.seconds, t_start)
    run.end("FINISHED", metrics={f"{k}_seconds": v for k, v in seconds.items()},
            step=result.steps, wait=wait)
    return Outcome(final, run.run_id, uri, seconds)


def _seconds(result: trainer.Result, tracking_seconds: float, t_start: float) -> dict:
    return {"train": result.train_seconds, "eval": result.eval_seconds,
            "tracking": tracking_seconds, "wall": time.perf_counter() - t_start}


def _log_outputs(run: writer.RemoteRun, resolved: dict, net: network.Network, ds: Dataset,
                 result: trainer.Result, summary: str, log_model: bool) -> None:
    """Hand the writer a folder with the config and the trained network (it draws the
    figures, logs them and the model, and removes the folder)."""
    folder = Path(tempfile.mkdtemp(prefix="mlplab-run-"))
    try:
        (folder / recorder.CONFIG_FILE).write_text(OmegaConf.to_yaml(resolved))
        network.save(net, folder / recorder.NETWORK_FILE, mean=ds.mean, std=ds.std)
        examples = None
        if log_model:
            examples = data.rows_to_images(_raw_examples(ds, recorder.EXAMPLE_ROWS),
                                           ds.image_shape)
        run.log_outputs(str(folder), result.history, summary, ds.image_shape,
                        ds.class_names, examples)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # the writer never got it
        raise


def _end_after_error(run: writer.RemoteRun, status: str, failure: str | None = None,
                     report: bool = True):
    """Close the run; the error that ended it is the one to raise, so a tracking
    failure here is only reported."""
    try:
        run.end(status, failure=failure)
    except writer.TrackingError as err:
        if report:
            print(f"mlplab: the run could not be closed in MLflow: {err}", file=sys.stderr)


def _raw_examples(ds: Dataset, n: int) -> np.ndarray:
    """The first n test rows undone back to uint8 pixels, as a user would pass them."""
    rows = ds.X_test[:n].astype(np.float64) * ds.std + ds.mean
    return np.clip(np.rint(rows), 0, 255).astype(np.uint8)


def print_summary(outcome: Outcome, cfg: DictConfig) -> None:
    f, s = outcome.final, outcome.seconds
    share = 100 * s["tracking"] / s["wall"] if s["wall"] else 0.0
    where = (f"mlplab run {outcome.run_id} (experiment {cfg.tracking.experiment!r})"
             if outcome.run_id else "mlplab run, not tracked (tracking.enabled=false)")
    print(
        f"\n{where}\n"
        f"  accuracy  train {f['train_acc']:.4f}   val {f['val_acc']:.4f}   "
        f"test {f['test_acc']:.4f}\n"
        f"  cost      train {f['train_cost']:.4f}   val {f['val_cost']:.4f}\n"
        f"  seconds   train {s['train']:.1f}   eval {s['eval']:.1f}   "
        f"tracking {s['tracking']:.2f} ({share:.1f}% of {s['wall']:.1f})"
    )
    if outcome.run_id:
        print(f"  browse    mlflow ui --backend-store-uri {outcome.tracking_uri}")


def exit_with(message: str, code: int):
    """End a command with one line on stderr (no traceback) and an exit status."""
    print(f"mlplab: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point. In a multirun a diverged trial returns NaN (recorded as failed
    by the sweeper) instead of stopping the sweep; a single run exits non-zero."""
    multirun = in_multirun()
    try:
        outcome = run_experiment(cfg, wait=not multirun)
    except (ConfigError, DataError) as err:
        if multirun:
            raise
        exit_with(f"error: {err}", 2)
    except trainer.Diverged as err:
        if multirun:
            print(f"mlplab: run FAILED: {err}", file=sys.stderr)
            return math.nan
        exit_with(f"run FAILED: {err}", 1)
    except writer.TrackingError as err:
        if multirun:
            raise
        exit_with(f"tracking failed: {err}", 1)
    print_summary(outcome, cfg)
    return outcome.val_acc

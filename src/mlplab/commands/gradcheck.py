"""The gradient check: every parameter's analytic gradient against numerical
differences, on a reduced problem, composed from the same config as training.

    python -m mlplab.commands.gradcheck model.layers=[50,50] bn=true gradcheck.d=20 gradcheck.n=10
    mlplab-gradcheck experiment=nine_layer_bn gradcheck.n=2

The network of `model` (and `bn`) is built for the first `gradcheck.d` input
dimensions of the configured dataset's first `gradcheck.n` training samples, in
float64, with its b, gamma and beta moved off their initial values (gradcheck.jitter).
Each parameter is judged on its entries whose differences cross no ReLU kink (see
mlplab.engine.gradcheck for why, and for how eps and the order are sized). The table, one
row per W, b, gamma and beta, is printed and recorded as an MLflow run tagged
mlplab.kind=gradcheck: metrics gradcheck.max_rel_err.<param> etc., and the table as
the artifact gradcheck.md. Exit status: 0 every parameter passes, 1 some parameter
exceeds gradcheck.threshold, 2 a bad config value or missing data.

`check_network` is the check without Hydra or MLflow; `run_gradcheck(cfg)` is the
command without the command line.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlplab.app import config, experiment, passwords, store, tracking
from mlplab.app.config import ConfigError
from mlplab.app.experiment import build_dataset
from mlplab.commands.common import (
    CONF_DIR,
    exit_with,
    in_multirun,
    pending_line,
    run_tags,
    tracked_run,
)
from mlplab.engine import gradcheck, network
from mlplab.engine.data import DataError

KIND = "gradcheck"  # value of the mlplab.kind tag
TABLE_FILE = "gradcheck.md"


class GradcheckFailed(AssertionError):
    """Some parameter's gradient is off by more than the threshold."""


@dataclass
class GradcheckOutcome:
    rows: list[gradcheck.Row]
    summary: str
    run_id: str
    tracking_uri: str
    seconds: float

    @property
    def passed(self) -> bool:
        return gradcheck.passed(self.rows)


def relu_pattern(net: network.Network, X) -> np.ndarray:
    """Which hidden ReLU units are on, for every sample of X: (n, d) -> flat bool array.

    This names the smooth piece of the cost the parameters sit on (see
    gradcheck.kink_crossings).
    """
    _, caches = network.forward(net, X, train=True, update_stats=False)
    # a hidden layer's cache is (affine, batch norm, ReLU); the ReLU's is its output
    return np.concatenate([np.zeros(0, bool)] + [c_relu.ravel() > 0
                                                 for _, _, c_relu in caches[:-1]])


def move_off_initial_values(net: network.Network, std: float, rng) -> None:
    """Add N(0, std^2) noise to every b, gamma and beta, in place.

    Their initial values are special points: at gamma = 1 a backward pass that forgets
    a factor of gamma is still right, and with b = 0 a sample whose previous layer is
    all off sits exactly on a ReLU kink, where no difference can check anything.
    """
    rng = np.random.default_rng(rng)
    for name, p in net.params.items():
        if not name.startswith("W"):
            p += rng.normal(0.0, std, p.shape)


def check_network(net: network.Network, X, y, lam: float, *, h: float = gradcheck.DEFAULT_H,
                  order: int = gradcheck.DEFAULT_ORDER, eps: float = gradcheck.DEFAULT_EPS,
                  threshold: float = gradcheck.DEFAULT_THRESHOLD,
                  exclude_kinks: bool = True,
                  label_smoothing: float = 0.0) -> list[gradcheck.Row]:
    """Check the gradient of the training cost (loss + L2) for every parameter of `net`.

    net: float64 network; X: (n, d) float64, y: (n,) ints. Batch norm uses the batch
    statistics and leaves the running averages alone; dropout draws the same masks at
    every evaluation (network.DROPOUT_SEED), so the cost is one smooth function.
    """
    def cost():
        return network.cost_and_grads(net, X, y, lam, update_stats=False,
                                      label_smoothing=label_smoothing)[1]

    analytic = network.cost_and_grads(net, X, y, lam, update_stats=False,
                                      label_smoothing=label_smoothing)[2]
    numeric = gradcheck.numerical_gradients(cost, net.params, h, order=order)
    kinks = None
    if exclude_kinks:
        kinks = gradcheck.kink_crossings(lambda: relu_pattern(net, X), net.params,
                                         gradcheck.largest_step(h, order))
    return gradcheck.compare(analytic, numeric, eps=eps, threshold=threshold, exclude=kinks)


def reduced_problem(cfg: DictConfig):
    """The first n training samples' first d dimensions: (X: (n, d) float64, y: (n,),
    number of classes, data fingerprint)."""
    g = cfg.gradcheck
    ds = build_dataset(cfg)
    rows, dims = ds.X_train.shape
    if g.n > rows:
        raise ConfigError(f"gradcheck.n={g.n}: the training split has {rows} rows: "
                          f"allowed 1..{rows}")
    if g.d > dims:
        raise ConfigError(f"gradcheck.d={g.d}: the data have {dims} dimensions: "
                          f"allowed 1..{dims}")
    X = ds.X_train[:g.n, :g.d].astype(np.float64)
    return X, ds.y_train[:g.n], ds.n_classes, ds.fingerprint


def describe(net: network.Network, cfg: DictConfig, lam: float) -> str:
    g = cfg.gradcheck
    return f"{net.arch}, n={g.n}, lam={lam:g}, h={g.h:g}, order {g.order}"


def run_gradcheck(cfg: DictConfig) -> GradcheckOutcome:
    """Validate, build the reduced problem, check it and track it. Raises ConfigError
    or DataError before anything is recorded."""
    t_start = time.perf_counter()
    experiment.validate(cfg)
    config.validate_gradcheck(cfg)
    g, m = cfg.gradcheck, cfg.model
    lam = cfg.lam if g.lam is None else g.lam
    X, y, n_classes, fingerprint = reduced_problem(cfg)
    init_seed, jitter_seed = np.random.SeedSequence(g.seed).spawn(2)
    net = network.init_network(g.d, list(m.layers), n_classes, bn=cfg.bn, init=m.init,
                               init_std=m.init_std, bn_momentum=m.bn_momentum,
                               dropout=experiment.dropout_rates(cfg),
                               rng=np.random.default_rng(init_seed), dtype=np.float64)
    move_off_initial_values(net, g.jitter, np.random.default_rng(jitter_seed))
    summary = describe(net, cfg, lam)
    rows = check_network(net, X, y, lam, h=g.h, order=g.order, eps=g.eps,
                         threshold=g.threshold, exclude_kinks=g.exclude_kinks,
                         label_smoothing=cfg.train.label_smoothing)
    seconds = time.perf_counter() - t_start
    ok = gradcheck.passed(rows)

    uri = store.resolve_uri(cfg.tracking.uri)
    with tracked_run(cfg, cfg.tracking.run_name or f"gradcheck {summary}",
                     {"mlplab.kind": KIND}) as run:
        run.log_params(tracking.flatten(OmegaConf.to_container(cfg, resolve=True)))
        run.set_tags(run_tags(cfg, summary, fingerprint)
                     | {"gradcheck.result": "passed" if ok else "failed"})
        metrics = {"gradcheck.passed": float(ok),
                   "gradcheck.max_rel_err": max((r.max_rel_err for r in rows if r.n_compared),
                                                default=float("nan")),
                   "gradcheck_seconds": seconds}
        for r in rows:
            metrics |= {f"gradcheck.max_rel_err.{r.name}": r.max_rel_err,
                        f"gradcheck.max_abs_err.{r.name}": r.max_abs_err,
                        f"gradcheck.share_ok.{r.name}": r.share_ok,
                        f"gradcheck.kinks.{r.name}": r.n_excluded}
        run.log_metrics(metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / TABLE_FILE
            path.write_text(format_result(rows, summary, cfg) + "\n")
            run.log_artifact(path)
    if run.pending:
        print("mlplab: " + pending_line(run.pending, run.spool.folder.parent, uri),
              file=sys.stderr)
    return GradcheckOutcome(rows, summary, run.run_id, uri, seconds)


def format_result(rows: list[gradcheck.Row], summary: str, cfg: DictConfig) -> str:
    """The table with a heading that says what was checked and how it is judged."""
    g = cfg.gradcheck
    verdict = "PASSED" if gradcheck.passed(rows) else "FAILED"
    return "\n".join([
        f"# Gradient check {verdict}: {summary}", "",
        f"relative error |g_a - g_n| / max({g.eps:g}, |g_a| + |g_n|), threshold "
        f"{g.threshold:g}; share ok = share of entries within it; kinks = entries "
        + ("left out because their differences cross a ReLU kink" if g.exclude_kinks
           else "not detected (gradcheck.exclude_kinks=false)"), "",
        gradcheck.format_table(rows),
    ])


@hydra.main(config_path=str(CONF_DIR), config_name="gradcheck", version_base="1.3")
def main(cfg: DictConfig) -> bool:
    """Hydra entry point. A single run exits 1 when the check fails; in a multirun a
    failing check raises, so the other jobs still run and the sweep ends non-zero."""
    try:
        outcome = run_gradcheck(cfg)
    except (ConfigError, DataError) as err:
        if in_multirun():
            raise
        exit_with(f"error: {err}", 2)
    print(format_result(outcome.rows, outcome.summary, cfg))
    print(f"\n{outcome.seconds:.1f} s; recorded as run {outcome.run_id} (experiment "
          f"{cfg.tracking.experiment!r}): mlflow ui --backend-store-uri "
          f"{passwords.mask_password(outcome.tracking_uri)}")
    if not outcome.passed:
        if in_multirun():
            raise GradcheckFailed(outcome.summary)
        sys.exit(1)
    return True


if __name__ == "__main__":
    main()

"""Mini-batch gradient descent with evaluation points.

Plain code: shuffle every epoch, walk the batches (augmented, if asked), take a step
of the optimiser (plain SGD by default) at the rate the schedule gives, and at each
evaluation point measure loss, cost and accuracy on the training and validation
splits (the training split on a fixed subset of its rows, if asked: the curve needs
no more, and evaluating all of it can cost half as much as training). Each phase runs
with the BLAS threads `mlplab.engine.threads` gives it. `on_eval` receives each record as it
is made (the app uses it to log to MLflow) and may stop training there by returning
True (a sweep prunes a hopeless trial so), `on_progress` the step every
PROGRESS_EVERY steps (the app checks its tracking there); nothing here knows about
tracking or sweeps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlplab.engine import checks, layers, network, optim, threads
from mlplab.engine.data import Dataset
from mlplab.engine.network import Network

PROGRESS_EVERY = 50  # steps between progress-bar text updates: updates cost time


class Diverged(ArithmeticError):
    """The cost became NaN or infinite."""

    def __init__(self, step: int, value: float):
        super().__init__(f"training diverged at update step {step}: cost is {value} "
                         "(try a smaller learning rate or initial weight scale)")
        self.step, self.value = step, value


@dataclass
class Result:
    history: list[dict[str, float]]  # one record per evaluation point
    final: dict[str, float]  # train/val/test accuracy and loss at the end
    train_seconds: float = 0.0  # update steps only
    eval_seconds: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)
    stopped: bool = False  # on_eval ended training before the schedule did


PLAIN_SGD = optim.SGD()


def sgd_step(net: Network, Xb, yb, eta: float, lam: float, optimizer=None, *,
             dropout_rng=network.DROPOUT_SEED, label_smoothing: float = 0.0) -> float:
    """One stochastic-gradient update on a batch Xb: (b, d), yb: (b,); returns the
    batch loss (no penalty; smoothed if `label_smoothing`).

    optimizer: an mlplab.engine.optim optimiser, plain SGD when None. dropout_rng: where the
    network's dropout masks come from (see network.forward).
    """
    scores, caches = network.forward(net, Xb, train=True, dropout_rng=dropout_rng)
    loss, dscores = layers.softmax_cross_entropy(scores, yb, label_smoothing)
    grads = network.backward(net, dscores, caches)
    (optimizer or PLAIN_SGD).step(net.params, grads, eta, lam)
    return loss


def eval_steps(total: int, every: int) -> list[int]:
    """Steps after which to evaluate: 0, every, 2*every, ... and always the last."""
    steps = list(range(0, total + 1, every))
    return steps if steps[-1] == total else steps + [total]


def evaluate_splits(net: Network, splits: dict, lam: float) -> dict[str, float]:
    """{"<split>_loss", "_cost", "_acc"} of each split: {name: (X: (n, d), y: (n,))}."""
    record = {}
    for split, (X, y) in splits.items():
        for key, value in network.evaluate(net, X, y, lam).items():
            record[f"{split}_{key}"] = value
    return record


def eval_rows(n: int, rows: int | None) -> np.ndarray | slice:
    """The rows of an n-row split that evaluation reads: `rows` evenly spaced ones
    (the same at every point of every run on that split), or all (None, or rows >= n).
    Evenly spaced rather than the first: a split's order may not be random."""
    if rows is None or rows >= n:
        return slice(None)
    return np.arange(rows) * n // rows


def check_options(*, lam: float, evals_per_cycle: int = 10, label_smoothing: float = 0.0,
                  eval_train_rows: int | None = None, threads: int | None = None) -> None:
    """Check train's settings that do not depend on the data."""
    checks.non_negative("lam", lam)
    checks.positive_int("evals_per_cycle", evals_per_cycle)
    checks.fraction("label_smoothing", label_smoothing)
    if eval_train_rows is not None:
        checks.positive_int("eval_train_rows", eval_train_rows)
    if threads is not None:
        checks.positive_int("threads", threads)


def train(net: Network, data: Dataset, schedule, *, lam: float, batch_size: int,
          rng=None, evals_per_cycle: int = 10, optimizer=None, augment=None,
          label_smoothing: float = 0.0, eval_train_rows: int | None = None,
          threads: int | None = None,
          on_eval: Callable[[dict], bool | None] | None = None,
          on_progress: Callable[[int], None] | None = None, progress: bool = True) -> Result:
    """Train `net` in place on `data` with `schedule` (see mlplab.engine.schedules).

    optimizer: from mlplab.engine.optim (e.g. optim.make_optimizer("momentum")), a fresh one
    per run since it carries its state; None is plain SGD. augment: a callable
    (Xb: (b, d), rng) -> (b, d) applied to every training batch, e.g.
    augment.FlipTranslate(); None leaves batches as they are. label_smoothing: in
    [0, 1), for the training loss only (evaluation reports the plain cross-entropy).
    Dropout is the network's (net.dropout). eval_train_rows: evaluate the training
    split on that many evenly spaced rows (None: all; validation is always whole).
    threads: the BLAS threads this run may use (mlplab.engine.threads: all of them for
    evaluation, fewer for small update steps); None leaves BLAS as it is. The
    threads each phase ran with are in `result.extra["threads"]`.

    Randomness comes from `rng` alone: it shuffles, and two streams spawned from it
    draw the dropout masks and the augmentations, so switching either on changes
    neither the shuffles nor the other's draws. Same seed, same numbers.
    Raises Diverged as soon as a batch loss or an evaluated cost is not finite.
    When `on_eval` returns True, training ends after that evaluation: the result's
    final accuracies are of that point (test included) and `stopped` is True, unless
    it was the last evaluation (nothing was cut short).
    """
    rng = np.random.default_rng(rng)
    X, y = data.X_train, data.y_train
    n = len(y)
    check_options(lam=lam, evals_per_cycle=evals_per_cycle, label_smoothing=label_smoothing,
                  eval_train_rows=eval_train_rows, threads=threads)
    checks.require(isinstance(batch_size, (int, np.integer)) and 0 < batch_size <= n,
                   "batch_size", batch_size, f"must be between 1 and the {n} training rows")
    dropout_rng, augment_rng = rng.spawn(2)
    # only what is set, so that the plain path calls sgd_step as it always has
    step_options = {key: value for key, value in [
        ("optimizer", optimizer), ("label_smoothing", label_smoothing),
        ("dropout_rng", dropout_rng if any(net.dropout) else None)] if value}
    per_epoch = n // batch_size
    total = schedule.total_steps(per_epoch)
    rates = schedule.rates(total)
    checkpoints = eval_steps(total, schedule.eval_every(per_epoch, evals_per_cycle))
    fit_rows = eval_rows(n, eval_train_rows)
    splits = {"train": (X[fit_rows], y[fit_rows]), "val": (data.X_val, data.y_val)}
    phases = threads_of(net, batch_size, threads)
    history: list[dict[str, float]] = []
    t_train = t_eval = 0.0

    def evaluate_at(step: int) -> bool:
        """Evaluate; True if on_eval asks to stop before the end (at the last step
        there is nothing left to stop: the run is complete)."""
        nonlocal t_eval
        t0 = time.perf_counter()
        rec = {"step": step, "epoch": step / per_epoch,
               "lr": float(rates[min(step, total - 1)])}
        with phases.evaluate():
            rec |= evaluate_splits(net, splits, lam)
        t_eval += time.perf_counter() - t0
        if not math.isfinite(rec["train_cost"]):
            raise Diverged(step, rec["train_cost"])
        history.append(rec)
        return bool(on_eval and on_eval(rec)) and step < total

    bar = _progress_bar(total, progress)
    next_eval = iter(checkpoints)
    due = next(next_eval)
    step = 0
    stopped = False
    phases.start()
    try:
        while True:
            if step == due:
                stopped = evaluate_at(step)
                due = next(next_eval, None)
            if step == total or stopped:
                break
            t0 = time.perf_counter()
            order = rng.permutation(n)
            for b in range(min(per_epoch, total - step)):
                idx = order[b * batch_size:(b + 1) * batch_size]
                Xb = X[idx] if augment is None else augment(X[idx], augment_rng)
                loss = sgd_step(net, Xb, y[idx], float(rates[step]), lam, **step_options)
                step += 1
                if not math.isfinite(loss):
                    raise Diverged(step, loss)
                if step % PROGRESS_EVERY == 0:
                    if bar is not None:
                        bar.set_postfix(lr=f"{rates[step - 1]:.2e}", loss=f"{loss:.3f}",
                                        refresh=False)
                        bar.update(PROGRESS_EVERY)
                    if on_progress:
                        on_progress(step)
                if step == due:
                    t_train += time.perf_counter() - t0
                    stopped = evaluate_at(step)
                    due = next(next_eval, None)
                    t0 = time.perf_counter()
                    if stopped:
                        break
            t_train += time.perf_counter() - t0
        # The last evaluation point is the end of training: only the test split is new.
        final = {k: v for k, v in history[-1].items() if k.startswith(("train_", "val_"))}
        with phases.evaluate():
            final |= evaluate_splits(net, {"test": (data.X_test, data.y_test)}, lam)
    finally:
        phases.stop()
        if bar is not None:
            bar.close()
    return Result(history, final, t_train, t_eval, step, stopped=stopped,
                  extra={"threads": phases.used} if threads else {})


def threads_of(net: Network, batch_size: int, n: int | None):
    """The thread limit of each phase for a run given n threads (None: untouched)."""
    if n is None:
        return threads.Unchanged()
    return threads.Phases(n, threads.step_macs(net.sizes, batch_size))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="train", leave=False, mininterval=0.5)

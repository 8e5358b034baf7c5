"""Mini-batch gradient descent with evaluation points.

Plain code: shuffle every epoch, walk the batches, take a step at the rate the
schedule gives, and at each evaluation point measure loss, cost and accuracy on the
training and validation splits. `on_eval` receives each record as it is made (the
app uses it to log to MLflow), `on_progress` the step every PROGRESS_EVERY steps (the
app checks its tracking there); nothing here knows about tracking.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlplab import layers, network
from mlplab.data import Dataset
from mlplab.network import Network

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


def sgd_step(net: Network, Xb, yb, eta: float, lam: float) -> float:
    """One update on a batch Xb: (b, d), yb: (b,); returns the batch loss (no penalty)."""
    scores, caches = network.forward(net, Xb, train=True)
    loss, dscores = layers.softmax_cross_entropy(scores, yb)
    grads = network.backward(net, dscores, caches)
    params = net.params
    decay = 1.0 - 2.0 * eta * lam  # W - eta * (g + 2 lam W), without a temporary
    for name, g in grads.items():
        p = params[name]
        if name[0] == "W" and lam:
            p *= decay
        g *= eta
        p -= g
    return loss


def eval_steps(total: int, every: int) -> list[int]:
    """Steps after which to evaluate: 0, every, 2*every, ... and always the last."""
    steps = list(range(0, total + 1, every))
    return steps if steps[-1] == total else steps + [total]


def evaluate_splits(net: Network, data: Dataset, lam: float, splits=("train", "val")):
    record = {}
    for split in splits:
        X, y = getattr(data, f"X_{split}"), getattr(data, f"y_{split}")
        for key, value in network.evaluate(net, X, y, lam).items():
            record[f"{split}_{key}"] = value
    return record


def train(net: Network, data: Dataset, schedule, *, lam: float, batch_size: int,
          rng=None, evals_per_cycle: int = 10,
          on_eval: Callable[[dict], None] | None = None,
          on_progress: Callable[[int], None] | None = None, progress: bool = True) -> Result:
    """Train `net` in place on `data` with `schedule` (see mlplab.schedules).

    Raises Diverged as soon as a batch loss or an evaluated cost is not finite.
    """
    rng = np.random.default_rng(rng)
    X, y = data.X_train, data.y_train
    n = len(y)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {n} training rows")
    per_epoch = n // batch_size
    total = schedule.total_steps(per_epoch)
    rates = schedule.rates(total)
    checkpoints = eval_steps(total, schedule.eval_every(per_epoch, evals_per_cycle))
    history: list[dict[str, float]] = []
    t_train = t_eval = 0.0

    def evaluate_at(step: int):
        nonlocal t_eval
        t0 = time.perf_counter()
        rec = {"step": step, "epoch": step / per_epoch,
               "lr": float(rates[min(step, total - 1)])}
        rec |= evaluate_splits(net, data, lam)
        t_eval += time.perf_counter() - t0
        if not math.isfinite(rec["train_cost"]):
            raise Diverged(step, rec["train_cost"])
        history.append(rec)
        if on_eval:
            on_eval(rec)

    bar = _progress_bar(total, progress)
    next_eval = iter(checkpoints)
    due = next(next_eval)
    step = 0
    try:
        while True:
            if step == due:
                evaluate_at(step)
                due = next(next_eval, None)
            if step == total:
                break
            t0 = time.perf_counter()
            order = rng.permutation(n)
            for b in range(min(per_epoch, total - step)):
                idx = order[b * batch_size:(b + 1) * batch_size]
                loss = sgd_step(net, X[idx], y[idx], float(rates[step]), lam)
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
                    evaluate_at(step)
                    due = next(next_eval, None)
                    t0 = time.perf_counter()
            t_train += time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    # The last evaluation point is the end of training: only the test split is new.
    final = {k: v for k, v in history[-1].items() if k.startswith(("train_", "val_"))}
    final |= evaluate_splits(net, data, lam, ("test",))
    return Result(history, final, t_train, t_eval, step)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="train", leave=False, mininterval=0.5)

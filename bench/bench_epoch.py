"""Seconds per training epoch of mlplab's trainer, against its own floor and PyTorch.

    python bench/bench_epoch.py [--repeats 7] [--torch] [--data PATH --md5 MD5]

For each network it times one epoch over 45,000 CIFAR-sized rows at batch 100
through `mlplab.engine.trainer.train` itself (shuffle, batching and the update steps; the
evaluation is timed separately), and in the same run the matrix products alone: the
work no trainer can skip. For the plain-SGD nets that floor is layer 1's products
(forward X_b @ W1 and backward X_b^T @ dS1 for every batch). For the toolbox net
(best_mlp's 3072-1024-1024-10 with BN, flip-and-translate augmentation and Nesterov
momentum, plus dropout 0.1) it is every layer's forward, weight-gradient and
input-gradient products; its augmentation and optimiser steps are also timed alone,
beside the least time those steps' memory traffic takes at this machine's bandwidth.
`epoch / products` says how close to its floor the trainer is. "app's run" times the
same epoch as a run of the app trains it (`python train.py`): BLAS threads by
`mlplab.engine.threads`' rule, the training curve on the config's default 5,000 rows; its
ratio to the plain epoch (BLAS's own threads, the whole split) shows no run got slower.
With --torch (and PyTorch installed: `pip install torch==2.13.0`, for the bench only)
an eager PyTorch loop doing the same updates is timed too; for the toolbox net it
augments with mlplab's own FlipTranslate, so both do the same work.
Every figure is the median of --repeats rounds in one process, each round timing every
part once (interleaved, so a slow spell of the machine hits a round, not one part);
the ratios are medians of each round's ratio.
Synthetic standard-normal data by default: speed does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from statistics import median

import numpy as np

from mlplab.engine import augment, data, network, optim, schedules, trainer
from mlplab.engine.threads import available_cores

N_TRAIN, N_VAL, BATCH, D, K = 45_000, 5_000, 100, 3072, 10
NETWORKS = {  # name: (hidden sizes, batch norm)
    "3072-50-10": ([50], False),
    "3072-50-50-10 BN": ([50, 50], True),
    "9-layer BN": ([50, 30, 20, 20, 10, 10, 10, 10], True),
}
# the toolbox net: best_mlp's network and update with every new piece on, dropout too
TOOLBOX_NAME = "3072-1024-1024-10 BN, dropout 0.1, flip_translate, Nesterov"
TOOLBOX_HIDDEN, TOOLBOX_DROPOUT, TOOLBOX_MAX_SHIFT, TOOLBOX_MOMENTUM = [1024, 1024], 0.1, 4, 0.9
ETA, LAM = 0.01, 1e-3
APP_EVAL_ROWS = 5000  # train.eval_train_rows' default


def synthetic_dataset(seed=0) -> data.Dataset:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_TRAIN + N_VAL, D), dtype=np.float32)
    y = rng.integers(0, K, N_TRAIN + N_VAL)
    return data.Dataset(X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:], X[:10], y[:10],
                        np.zeros(D, np.float32), np.ones(D, np.float32), (32, 32, 3),
                        data.CIFAR10_CLASSES, "synthetic", "bench")


def real_dataset(path, md5) -> data.Dataset:
    return data.load_dataset(split="all", n_val=N_VAL, url=path, md5=md5)


def toolbox_optimizer():
    return optim.make_optimizer("momentum", momentum=TOOLBOX_MOMENTUM, nesterov=True)


def mlplab_epoch(ds, hidden, bn, seed, toolbox=False, **options) -> tuple[float, float]:
    """(seconds for one epoch of updates, seconds for one evaluation); `options` for
    trainer.train (the app's: threads, eval_train_rows)."""
    if toolbox:
        options |= {"optimizer": toolbox_optimizer(),
                    "augment": augment.FlipTranslate(max_shift=TOOLBOX_MAX_SHIFT)}
    net = network.init_network(D, hidden, K, bn=bn, rng=seed,
                               dropout=TOOLBOX_DROPOUT if toolbox else 0.0)
    result = trainer.train(net, ds, schedules.Constant(eta=ETA, epochs=1), lam=LAM,
                           batch_size=BATCH, rng=seed, progress=False, **options)
    return result.train_seconds, result.eval_seconds / 2


def products(ds, sizes, seed) -> float:
    """Seconds for an epoch of the matrix products of layers sizes[0] -> sizes[1] ->
    ...: each layer's forward H @ W and weight gradient H^T @ dS, and above layer 1
    the input gradient dS @ W^T. sizes = [D, width] is layer 1 alone."""
    rng = np.random.default_rng(seed)
    Ws = [rng.standard_normal(shape, dtype=np.float32)
          for shape in zip(sizes[:-1], sizes[1:], strict=True)]
    dSs = [rng.standard_normal((BATCH, b), dtype=np.float32) for b in sizes[1:]]
    Hs = [rng.standard_normal((BATCH, a), dtype=np.float32) for a in sizes[1:-1]]
    X = ds.X_train
    t0 = time.perf_counter()
    for b in range(N_TRAIN // BATCH):
        inputs = [X[b * BATCH:(b + 1) * BATCH], *Hs]
        for layer, (H, W, dS) in enumerate(zip(inputs, Ws, dSs, strict=True)):
            H @ W
            H.T @ dS
            if layer > 0:
                dS @ W.T
    return time.perf_counter() - t0


def augmentation(ds, seed) -> float:
    """Seconds for an epoch of flip-and-translate on shuffled batches, alone."""
    rng = np.random.default_rng(seed)
    aug = augment.FlipTranslate(max_shift=TOOLBOX_MAX_SHIFT)
    order = rng.permutation(N_TRAIN)
    t0 = time.perf_counter()
    for b in range(N_TRAIN // BATCH):
        aug(ds.X_train[order[b * BATCH:(b + 1) * BATCH]], rng)
    return time.perf_counter() - t0


def update(seed) -> float:
    """Seconds for an epoch of the toolbox net's optimiser steps alone (Nesterov, L2),
    each on fresh gradients as the trainer's are (copying them is not timed)."""
    rng = np.random.default_rng(seed)
    net = network.init_network(D, TOOLBOX_HIDDEN, K, bn=True, rng=seed)
    grads = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in net.params.items()}
    opt = toolbox_optimizer()
    seconds = 0.0
    for _ in range(N_TRAIN // BATCH):
        fresh = {k: g.copy() for k, g in grads.items()}
        t0 = time.perf_counter()
        opt.step(net.params, fresh, ETA, LAM)
        seconds += time.perf_counter() - t0
    return seconds


def update_floor(seed) -> float:
    """Seconds an epoch of those steps needs at least on this machine: each must read
    weights, velocity and gradient and write two of them (20 bytes a parameter), at
    the bandwidth of a 64 MB np.copyto (median of 5; it reads and writes)."""
    src = np.ones(16 * 2**20, np.float32)
    dst = np.empty_like(src)
    copies = []
    for _ in range(6):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - t0)
    bandwidth = 2 * src.nbytes / median(copies[1:])
    net = network.init_network(D, TOOLBOX_HIDDEN, K, bn=True, rng=seed)
    return (N_TRAIN // BATCH) * 20 * sum(p.size for p in net.params.values()) / bandwidth


def torch_epoch(ds, hidden, bn, seed, toolbox=False) -> float:
    """An eager PyTorch epoch with the same shuffling, batches and updates: plain SGD,
    or for the toolbox net dropout, mlplab's augmentation and Nesterov momentum with L2 on the
    weights only."""
    import torch

    torch.manual_seed(seed)
    mods, d = [], D
    for h in hidden:
        mods += [torch.nn.Linear(d, h, bias=not bn)]
        mods += [torch.nn.BatchNorm1d(h)] if bn else []
        mods += [torch.nn.ReLU()]
        mods += [torch.nn.Dropout(TOOLBOX_DROPOUT)] if toolbox else []
        d = h
    model = torch.nn.Sequential(*mods, torch.nn.Linear(d, K))
    if toolbox:
        weights = [p for p in model.parameters() if p.dim() == 2]
        others = [p for p in model.parameters() if p.dim() != 2]
        opt = torch.optim.SGD([{"params": weights, "weight_decay": 2 * LAM},
                               {"params": others, "weight_decay": 0.0}],
                              lr=ETA, momentum=TOOLBOX_MOMENTUM, nesterov=True)
        aug, aug_rng = augment.FlipTranslate(max_shift=TOOLBOX_MAX_SHIFT), \
            np.random.default_rng(seed)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=ETA, weight_decay=2 * LAM)
    X, y = ds.X_train, torch.from_numpy(ds.y_train)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    order = np.random.default_rng(seed).permutation(N_TRAIN)
    for b in range(N_TRAIN // BATCH):
        idx = order[b * BATCH:(b + 1) * BATCH]
        Xb = aug(X[idx], aug_rng) if toolbox else X[idx]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(torch.from_numpy(Xb)), y[idx]).backward()
        opt.step()
    return time.perf_counter() - t0


def rounds(timers: dict[str, Callable[[int], object]], repeats: int) -> dict[str, list]:
    """Each timer once per round (seed = the round), for `repeats` rounds after a
    warm-up round. This machine's speed can change 2x for minutes at a time: timed
    back to back, such a spell falls on one timer and skews its ratio to the others;
    interleaved, it falls on a round, and a round's ratios still hold."""
    for timer in timers.values():
        timer(repeats)  # warm-up: caches, threads, PyTorch's kernels
    times: dict[str, list] = {key: [] for key in timers}
    keys = list(timers)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # each part leads in turn
            times[key].append(timers[key](r))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch eager")
    parser.add_argument("--data", help="a CIFAR-10 archive to use instead of synthetic rows")
    parser.add_argument("--md5", default=data.CIFAR10_MD5)
    args = parser.parse_args()

    ds = real_dataset(args.data, args.md5) if args.data else synthetic_dataset()
    rows = []
    cases = [(name, hidden, bn, False) for name, (hidden, bn) in NETWORKS.items()]
    cases.append((TOOLBOX_NAME, TOOLBOX_HIDDEN, True, True))
    for name, hidden, bn, toolbox in cases:
        sizes = [D, *hidden, K] if toolbox else [D, hidden[0]]
        timers = {"mlplab": partial(mlplab_epoch, ds, hidden, bn, toolbox=toolbox),
                  # as a run of the app trains: its thread rule, the training curve on
                  # the config's default rows
                  "app": partial(mlplab_epoch, ds, hidden, bn, toolbox=toolbox,
                                 threads=available_cores(), eval_train_rows=APP_EVAL_ROWS),
                  "products": partial(products, ds, sizes)}
        if toolbox:
            timers |= {"augment": partial(augmentation, ds), "update": update,
                       "update_floor": update_floor}
        if args.torch:
            timers["torch"] = partial(torch_epoch, ds, hidden, bn, toolbox=toolbox)
        times = rounds(timers, args.repeats)
        epochs = [epoch for epoch, _ in times["mlplab"]]
        row = {"network": name, "epoch": median(epochs),
               "eval": median(ev for _, ev in times["mlplab"]),
               "app": median(epoch for epoch, _ in times["app"]),
               "app_eval": median(ev for _, ev in times["app"]),
               "app_ratio": median(a / e for (a, _), e in zip(times["app"], epochs,
                                                              strict=True)),
               "products": median(times["products"]),
               "floor": "all layers" if toolbox else "layer 1",
               # ratios within each round, then their median
               "over_products": median(e / p for e, p in zip(epochs, times["products"],
                                                              strict=True))}
        row |= {key: median(times[key]) for key in ("augment", "update", "update_floor",
                                                    "torch") if key in times}
        row |= {f"{key}_share": median(t / e for t, e in zip(times[key], epochs, strict=True))
                for key in ("augment", "update") if key in times}
        if args.torch:
            row["torch_ratio"] = median(t / e for t, e in zip(times["torch"], epochs,
                                                              strict=True))
        rows.append(row)

    print(f"median of {args.repeats}, {N_TRAIN} rows, batch {BATCH}, "
          f"{'real data' if args.data else 'synthetic data'}")
    head = ("| network | mlplab s/epoch | products s (floor) | epoch / products | "
            "optimiser steps s (share; memory floor) | augmentation s | eval s | "
            "app's run: s/epoch (/ mlplab) | app's run: eval s |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if args.torch:
        head += " PyTorch eager s/epoch | PyTorch / mlplab |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows:
        aug, upd = (f"{r[k]:.3f} ({r[k + '_share']:.0%})" if k in r else "-"
                    for k in ("augment", "update"))
        if "update_floor" in r:
            upd = f"{upd[:-1]}; {r['update_floor']:.2f})"
        line = (f"| {r['network']} | {r['epoch']:.3f} | {r['products']:.3f} ({r['floor']}) | "
                f"{r['over_products']:.2f} | {upd} | {aug} | {r['eval']:.3f} | "
                f"{r['app']:.3f} ({r['app_ratio']:.2f}) | {r['app_eval']:.3f} |")
        if args.torch:
            line += f" {r['torch']:.3f} | {r['torch_ratio']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()

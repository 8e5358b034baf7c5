"""Seconds per training epoch of mlplab's trainer, against its own floor and PyTorch.

    python bench/bench_epoch.py [--repeats 7] [--torch] [--data PATH --md5 MD5]

For each network it times one epoch over 45,000 CIFAR-sized rows at batch 100
through `mlplab.trainer.train` itself (shuffle, batching and the update steps; the
evaluation is timed separately), and in the same run the layer-1 matrix products
alone (forward X_b @ W1 and backward X_b^T @ dS1 for every batch): the work no
trainer can skip. `epoch / layer-1` says how close to that floor the trainer is.
With --torch (and PyTorch installed) an eager PyTorch loop doing the same updates is
timed too. Every figure is the median of --repeats runs, taken in one process.
Synthetic standard-normal data by default: speed does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mlplab import data, network, schedules, trainer

N_TRAIN, N_VAL, BATCH, D, K = 45_000, 5_000, 100, 3072, 10
NETWORKS = {  # name: (hidden sizes, batch norm)
    "3072-50-10": ([50], False),
    "3072-50-50-10 BN": ([50, 50], True),
    "9-layer BN": ([50, 30, 20, 20, 10, 10, 10, 10], True),
}


def synthetic_dataset(seed=0) -> data.Dataset:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_TRAIN + N_VAL, D), dtype=np.float32)
    y = rng.integers(0, K, N_TRAIN + N_VAL)
    return data.Dataset(X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:], X[:10], y[:10],
                        np.zeros(D, np.float32), np.ones(D, np.float32), (32, 32, 3),
                        data.CIFAR10_CLASSES, "synthetic", "bench")


def real_dataset(path, md5) -> data.Dataset:
    return data.load_dataset(split="all", n_val=N_VAL, url=path, md5=md5)


def mlplab_epoch(ds, hidden, bn, seed) -> tuple[float, float]:
    """(seconds for one epoch of updates, seconds for the two evaluations)."""
    net = network.init_network(D, hidden, K, bn=bn, rng=seed)
    result = trainer.train(net, ds, schedules.Constant(eta=0.01, epochs=1), lam=1e-3,
                           batch_size=BATCH, rng=seed, progress=False)
    return result.train_seconds, result.eval_seconds / 2


def layer1_products(ds, width, seed) -> float:
    """Seconds for an epoch of the first layer's forward and weight-gradient products."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, width), dtype=np.float32)
    dS = rng.standard_normal((BATCH, width), dtype=np.float32)
    X = ds.X_train
    t0 = time.perf_counter()
    for b in range(N_TRAIN // BATCH):
        Xb = X[b * BATCH:(b + 1) * BATCH]
        Xb @ W
        Xb.T @ dS
    return time.perf_counter() - t0


def torch_epoch(ds, hidden, bn, seed) -> float:
    """An eager PyTorch epoch with the same shuffling, batches and plain SGD."""
    import torch

    torch.manual_seed(seed)
    mods, d = [], D
    for h in hidden:
        mods += [torch.nn.Linear(d, h, bias=not bn)]
        mods += [torch.nn.BatchNorm1d(h)] if bn else []
        mods += [torch.nn.ReLU()]
        d = h
    model = torch.nn.Sequential(*mods, torch.nn.Linear(d, K))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=2e-3)
    X, y = torch.from_numpy(ds.X_train), torch.from_numpy(ds.y_train)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(N_TRAIN))
    for b in range(N_TRAIN // BATCH):
        idx = order[b * BATCH:(b + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch eager")
    parser.add_argument("--data", help="a CIFAR-10 archive to use instead of synthetic rows")
    parser.add_argument("--md5", default=data.CIFAR10_MD5)
    args = parser.parse_args()

    ds = real_dataset(args.data, args.md5) if args.data else synthetic_dataset()
    rows = []
    for name, (hidden, bn) in NETWORKS.items():
        mlplab_epoch(ds, hidden, bn, seed=0)  # warm-up: caches, BLAS threads, page faults
        runs = [mlplab_epoch(ds, hidden, bn, seed=r) for r in range(args.repeats)]
        floor = [layer1_products(ds, hidden[0], seed=r) for r in range(args.repeats)]
        row = {"network": name,
               "epoch": statistics.median(r[0] for r in runs),
               "eval": statistics.median(r[1] for r in runs),
               "layer1": statistics.median(floor)}
        if args.torch:
            torch_epoch(ds, hidden, bn, seed=0)
            row["torch"] = statistics.median(
                torch_epoch(ds, hidden, bn, seed=r) for r in range(args.repeats))
        rows.append(row)

    print(f"median of {args.repeats}, {N_TRAIN} rows, batch {BATCH}, "
          f"{'real data' if args.data else 'synthetic data'}")
    head = "| network | mlplab s/epoch | layer-1 products s | epoch / layer-1 | eval s |"
    sep = "|---|---|---|---|---|"
    if args.torch:
        head += " PyTorch eager s/epoch | PyTorch / mlplab |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['network']} | {r['epoch']:.3f} | {r['layer1']:.3f} | "
                f"{r['epoch'] / r['layer1']:.2f} | {r['eval']:.3f} |")
        if args.torch:
            line += f" {r['torch']:.3f} | {r['torch'] / r['epoch']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()

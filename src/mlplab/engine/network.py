"""A k-layer fully connected ReLU network, optionally with batch normalisation.

The network is plain data: `params` holds what gradient descent learns, named
`W1, b1, gamma1, beta1, ..., Wk, bk`; `bn_stats` holds the running averages
(`mean1, var1, ...`) used at evaluation. Layer l (1-based) maps `(n, d_{l-1})` to
`(n, d_l)`; hidden layers are affine -> [batch norm] -> ReLU, the last is affine.

With batch normalisation a hidden layer has no bias: the batch mean cancels it
exactly, so it would only add a parameter whose gradient is always zero; `beta`
plays its role.

Dropout (`Network.dropout`, one rate per hidden layer) zeroes units after a hidden
layer's ReLU in training, inverted so that evaluation uses every unit unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlplab.engine import checks, layers

INITS = ("he", "xavier", "normal")
# Seed of the dropout masks when `forward` is given no generator: every such call
# draws the same masks, so a cost evaluated again and again (a gradient check) is one
# function of the parameters. Training passes its own generator.
DROPOUT_SEED = 0


@dataclass
class Network:
    params: dict[str, np.ndarray]
    n_layers: int
    bn: bool = False
    bn_momentum: float = 0.9
    bn_stats: dict[str, np.ndarray] = field(default_factory=dict)
    # dropout rate of each hidden layer's output; a single number applies to all of
    # them. Stored as a tuple of n_layers - 1 rates in [0, 1).
    dropout: tuple[float, ...] | float = 0.0

    def __post_init__(self):
        self.dropout = dropout_rates(self.dropout, self.n_layers - 1)

    @property
    def sizes(self) -> list[int]:
        """[d_in, hidden..., n_classes]."""
        first = self.params["W1"].shape[0]
        return [first] + [self.params[f"W{i}"].shape[1] for i in range(1, self.n_layers + 1)]

    @property
    def arch(self) -> str:
        """e.g. '3072-50-50-10 +BN': the sizes, and whether batch norm is on."""
        arch = "-".join(map(str, self.sizes)) + (" +BN" if self.bn else "")
        if any(self.dropout):
            arch += " +dropout " + "/".join(f"{r:g}" for r in sorted(set(self.dropout)))
        return arch

    @property
    def dtype(self):
        return self.params["W1"].dtype

    @property
    def n_params(self) -> int:
        """Trainable numbers: weights, biases and batch norm's scales and shifts."""
        return sum(p.size for p in self.params.values())

    def weight_names(self) -> list[str]:
        """The parameters L2 regularisation applies to (weights, not biases or BN)."""
        return [f"W{i}" for i in range(1, self.n_layers + 1)]


def dropout_rates(dropout, n_hidden: int) -> tuple[float, ...]:
    """A rate for every hidden layer, or a sequence of one rate per hidden layer ->
    a tuple of n_hidden rates, each checked to be in [0, 1)."""
    if np.ndim(dropout):  # a list, tuple, array or config list
        checks.require(len(dropout) == n_hidden, "dropout", list(dropout),
                       f"needs one rate per hidden layer ({n_hidden}), or a single rate")
        rates = tuple(dropout)
    else:
        rates = (dropout,) * n_hidden
    for rate in rates:
        checks.fraction("dropout", rate)
    return tuple(float(r) for r in rates)


def check_architecture(hidden, *, init="he", init_std=1e-2, bn_momentum=0.9,
                       dropout=0.0) -> None:
    """Check init_network's settings without drawing any weight."""
    checks.require(all(isinstance(h, (int, np.integer)) and h > 0 for h in hidden),
                   "hidden", list(hidden), "hidden sizes must be integers > 0")
    checks.one_of("init", init, INITS)
    checks.positive("init_std", init_std)
    checks.fraction("bn_momentum", bn_momentum)
    dropout_rates(dropout, len(hidden))


def init_network(d_in, hidden, n_classes, *, bn=False, init="he", init_std=1e-2,
                 bn_momentum=0.9, dropout=0.0, rng=None, dtype=np.float32) -> Network:
    """Draw initial weights.

    `init`: "he" (std sqrt(2/fan_in), suited to ReLU), "xavier" (std sqrt(1/fan_in)) or
    "normal" (std `init_std` for every layer, for the sensitivity experiment).
    `dropout`: a rate for every hidden layer or a list of one per hidden layer.
    """
    checks.positive_int("d_in", d_in)
    checks.positive_int("n_classes", n_classes)
    check_architecture(hidden, init=init, init_std=init_std, bn_momentum=bn_momentum,
                       dropout=dropout)  # Network checks the dropout rates again: cheap
    rng = np.random.default_rng(rng)
    sizes = [d_in, *hidden, n_classes]
    n_layers = len(sizes) - 1
    params, bn_stats = {}, {}
    for i in range(1, n_layers + 1):
        fan_in, fan_out = sizes[i - 1], sizes[i]
        std = {"he": np.sqrt(2.0 / fan_in), "xavier": np.sqrt(1.0 / fan_in)}.get(init, init_std)
        params[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) * std).astype(dtype)
        hidden_bn = bn and i < n_layers
        if hidden_bn:
            params[f"gamma{i}"] = np.ones(fan_out, dtype)
            params[f"beta{i}"] = np.zeros(fan_out, dtype)
            bn_stats[f"mean{i}"] = np.zeros(fan_out, dtype)
            bn_stats[f"var{i}"] = np.ones(fan_out, dtype)
        else:
            params[f"b{i}"] = np.zeros(fan_out, dtype)
    return Network(params, n_layers, bn, bn_momentum, bn_stats, dropout)


def forward(net: Network, X, *, train: bool, update_stats: bool = True,
            dropout_rng=DROPOUT_SEED):
    """X: (n, d) -> scores: (n, k), caches for `backward` (None unless `train`).

    In training batch norm uses the batch statistics and, when `update_stats`, moves
    the running averages; at evaluation it uses the running averages. Dropout acts in
    training only, with masks drawn from `dropout_rng`: a np.random.Generator (the
    trainer's), or an int seeding a new generator on every call, so that calls with the
    same seed drop the same units (DROPOUT_SEED by default).
    """
    p, s = net.params, net.bn_stats
    if train and any(net.dropout):
        dropout_rng = np.random.default_rng(dropout_rng)
    caches = []
    h = X
    for i in range(1, net.n_layers + 1):
        h, c_aff = layers.affine_forward(h, p[f"W{i}"], p.get(f"b{i}"))
        if i == net.n_layers:
            caches.append((c_aff, None, None))
            break
        c_bn = None
        if net.bn:
            stats = (s[f"mean{i}"], s[f"var{i}"]) if (update_stats or not train) else (None, None)
            h, c_bn = layers.batchnorm_forward(
                h, p[f"gamma{i}"], p[f"beta{i}"], train=train,
                running_mean=stats[0], running_var=stats[1], momentum=net.bn_momentum,
            )
        h, c_relu = layers.relu_forward(h)
        if train and net.dropout[i - 1]:
            # in place: the ReLU's cache, its output, becomes the output after dropout
            h, _ = layers.dropout_forward(h, net.dropout[i - 1], dropout_rng)
        caches.append((c_aff, c_bn, c_relu))
    return h, (caches if train else None)


def backward(net: Network, dscores, caches) -> dict[str, np.ndarray]:
    """dscores: (n, k) -> gradient of the loss for every entry of `net.params`."""
    grads = {}
    dh = dscores
    for i in range(net.n_layers, 0, -1):
        c_aff, c_bn, c_relu = caches[i - 1]
        if i < net.n_layers:
            if net.dropout[i - 1]:
                # Dropout's backward is dout * mask / (1 - rate). The ReLU's cache is
                # its output after dropout, zero wherever a unit was dropped, so
                # relu_backward applies the mask; only the scale is left here.
                dh *= 1.0 / (1.0 - net.dropout[i - 1])
            dh = layers.relu_backward(dh, c_relu)
            if net.bn:
                dh, grads[f"gamma{i}"], grads[f"beta{i}"] = layers.batchnorm_backward(dh, c_bn)
        dh, grads[f"W{i}"], db = layers.affine_backward(dh, c_aff, need_dx=i > 1)
        if f"b{i}" in net.params:
            grads[f"b{i}"] = db
    return grads


def l2_penalty(net: Network, lam: float) -> float:
    """lam * sum of squared weights (biases and BN parameters are not penalised)."""
    return lam * sum(float(np.sum(np.square(net.params[w], dtype=np.float64)))
                     for w in net.weight_names())


def cost_and_grads(net: Network, X, y, lam: float, *, update_stats: bool = True,
                   dropout_rng=DROPOUT_SEED, label_smoothing: float = 0.0):
    """Training-mode cost and its gradient.

    X: (n, d), y: (n,) ints -> (loss, cost, grads) where cost = loss + l2_penalty and
    grads include the penalty's 2 * lam * W. With the default `dropout_rng` (a seed)
    every call drops the same units: the cost is a function of the parameters alone,
    as a gradient check needs. `label_smoothing`: see layers.softmax_cross_entropy.
    """
    scores, caches = forward(net, X, train=True, update_stats=update_stats,
                             dropout_rng=dropout_rng)
    loss, dscores = layers.softmax_cross_entropy(scores, y, label_smoothing)
    grads = backward(net, dscores, caches)
    for w in net.weight_names():
        grads[w] += (2 * lam) * net.params[w]
    return loss, loss + l2_penalty(net, lam), grads


EVAL_CHUNK = 10_000  # rows per evaluation forward pass; bounds peak memory


def predict_scores(net: Network, X) -> np.ndarray:
    """X: (n, d) -> scores: (n, k) in evaluation mode, in chunks."""
    return np.concatenate([forward(net, X[i:i + EVAL_CHUNK], train=False)[0]
                           for i in range(0, len(X), EVAL_CHUNK)])


def evaluate(net: Network, X, y, lam: float) -> dict[str, float]:
    """Evaluation-mode loss, cost and accuracy of X: (n, d) with labels y: (n,)."""
    scores = predict_scores(net, X)
    acc = float(np.mean(scores.argmax(axis=1) == y))
    loss, _ = layers.softmax_cross_entropy(scores, y)
    return {"loss": loss, "cost": loss + l2_penalty(net, lam), "acc": acc}


def save(net: Network, path, **extra) -> None:
    """Write the network (and any extra arrays, e.g. input mean/std) to an .npz file."""
    arrays = {f"param/{k}": v for k, v in net.params.items()}
    arrays |= {f"stat/{k}": v for k, v in net.bn_stats.items()}
    arrays |= {f"extra/{k}": np.asarray(v) for k, v in extra.items()}
    meta = np.array([net.n_layers, int(net.bn), net.bn_momentum], dtype=np.float64)
    np.savez(path, meta=meta, dropout=np.array(net.dropout, dtype=np.float64), **arrays)


def load(path) -> tuple[Network, dict[str, np.ndarray]]:
    """Read what `save` wrote: (network, extra arrays)."""
    with np.load(path) as z:
        n_layers, bn, momentum = z["meta"]
        pick = lambda prefix: {k.split("/", 1)[1]: z[k] for k in z.files  # noqa: E731
                               if k.startswith(prefix)}
        # files saved before dropout existed have no rates: no dropout
        dropout = tuple(z["dropout"].tolist()) if "dropout" in z.files else 0.0
        net = Network(pick("param/"), int(n_layers), bool(bn), float(momentum),
                      pick("stat/"), dropout)
        return net, pick("extra/")

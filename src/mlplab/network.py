"""A k-layer fully connected ReLU network, optionally with batch normalisation.

The network is plain data: `params` holds what gradient descent learns, named
`W1, b1, gamma1, beta1, ..., Wk, bk`; `bn_stats` holds the running averages
(`mean1, var1, ...`) used at evaluation. Layer l (1-based) maps `(n, d_{l-1})` to
`(n, d_l)`; hidden layers are affine -> [batch norm] -> ReLU, the last is affine.

With batch normalisation a hidden layer has no bias: the batch mean cancels it
exactly, so it would only add a parameter whose gradient is always zero; `beta`
plays its role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlplab import layers

INITS = ("he", "xavier", "normal")


@dataclass
class Network:
    params: dict[str, np.ndarray]
    n_layers: int
    bn: bool = False
    bn_momentum: float = 0.9
    bn_stats: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        """[d_in, hidden..., n_classes]."""
        first = self.params["W1"].shape[0]
        return [first] + [self.params[f"W{i}"].shape[1] for i in range(1, self.n_layers + 1)]

    @property
    def arch(self) -> str:
        """e.g. '3072-50-50-10 +BN': the sizes, and whether batch norm is on."""
        return "-".join(map(str, self.sizes)) + (" +BN" if self.bn else "")

    @property
    def dtype(self):
        return self.params["W1"].dtype

    def weight_names(self) -> list[str]:
        """The parameters L2 regularisation applies to (weights, not biases or BN)."""
        return [f"W{i}" for i in range(1, self.n_layers + 1)]


def init_network(d_in, hidden, n_classes, *, bn=False, init="he", init_std=1e-2,
                 bn_momentum=0.9, rng=None, dtype=np.float32) -> Network:
    """Draw initial weights.

    `init`: "he" (std sqrt(2/fan_in), suited to ReLU), "xavier" (std sqrt(1/fan_in)) or
    "normal" (std `init_std` for every layer, for the sensitivity experiment).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
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
    return Network(params, n_layers, bn, bn_momentum, bn_stats)


def forward(net: Network, X, *, train: bool, update_stats: bool = True):
    """X: (n, d) -> scores: (n, k), caches for `backward` (None unless `train`).

    In training batch norm uses the batch statistics and, when `update_stats`, moves
    the running averages; at evaluation it uses the running averages.
    """
    p, s = net.params, net.bn_stats
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
        caches.append((c_aff, c_bn, c_relu))
    return h, (caches if train else None)


def backward(net: Network, dscores, caches) -> dict[str, np.ndarray]:
    """dscores: (n, k) -> gradient of the loss for every entry of `net.params`."""
    grads = {}
    dh = dscores
    for i in range(net.n_layers, 0, -1):
        c_aff, c_bn, c_relu = caches[i - 1]
        if i < net.n_layers:
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


def cost_and_grads(net: Network, X, y, lam: float, *, update_stats: bool = True):
    """Training-mode cost and its gradient.

    X: (n, d), y: (n,) ints -> (loss, cost, grads) where cost = loss + l2_penalty and
    grads include the penalty's 2 * lam * W.
    """
    scores, caches = forward(net, X, train=True, update_stats=update_stats)
    loss, dscores = layers.softmax_cross_entropy(scores, y)
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
    np.savez(path, meta=meta, **arrays)


def load(path) -> tuple[Network, dict[str, np.ndarray]]:
    """Read what `save` wrote: (network, extra arrays)."""
    with np.load(path) as z:
        n_layers, bn, momentum = z["meta"]
        pick = lambda prefix: {k.split("/", 1)[1]: z[k] for k in z.files  # noqa: E731
                               if k.startswith(prefix)}
        net = Network(pick("param/"), int(n_layers), bool(bn), float(momentum),
                      pick("stat/"))
        return net, pick("extra/")

"""Layers as forward/backward pairs.

Every `*_forward` returns `(out, cache)`; the matching `*_backward(dout, cache)` returns
the gradient with respect to each input, in the order of the forward's arguments.
Rows are samples: `x: (n, d)`. Arrays keep the dtype they arrive in (float32 for
training, float64 for gradient checks).
"""

from __future__ import annotations

import numpy as np

from mlplab.engine import checks

BN_EPS = 1e-5  # keeps 1/sqrt(var) finite for units that are constant in a batch


def affine_forward(x, W, b=None):
    """x: (n, d), W: (d, m), b: (m,) or None -> out: (n, m)."""
    out = x @ W
    if b is not None:
        out += b
    return out, (x, W)


def affine_backward(dout, cache, need_dx=True):
    """dout: (n, m) -> dx: (n, d) or None, dW: (d, m), db: (m,).

    `need_dx=False` skips the largest product of the first layer, whose input
    gradient nobody uses.
    """
    x, W = cache
    dW = x.T @ dout
    db = dout.sum(axis=0)
    dx = dout @ W.T if need_dx else None
    return dx, dW, db


def relu_forward(x):
    """x: (n, m) -> out: (n, m); the output doubles as the mask for backward."""
    out = np.maximum(x, 0, out=x)  # in place: the pre-activation is not needed again
    return out, out


def relu_backward(dout, cache):
    """dout: (n, m) -> dx: (n, m), zero where the unit was off (modifies dout)."""
    dout *= cache > 0
    return dout


def batchnorm_forward(x, gamma, beta, *, train, running_mean=None, running_var=None,
                      momentum=0.9):
    """Batch normalisation with a learnable scale and shift.

    x: (n, m), gamma, beta: (m,). In training the batch statistics are used and the
    running averages (updated in place when given) track them:
    running = momentum * running + (1 - momentum) * batch. At evaluation the running
    averages are used and nothing is cached.
    """
    if train:
        mean = x.mean(axis=0)
        x_hat = x - mean
        var = np.einsum("ij,ij->j", x_hat, x_hat) / len(x)  # reuses the centred x
        if running_mean is not None:
            running_mean *= momentum
            running_mean += (1 - momentum) * mean
            running_var *= momentum
            running_var += (1 - momentum) * var
    else:
        x_hat = x - running_mean
        var = running_var
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    x_hat *= inv_std.astype(x.dtype, copy=False)
    out = x_hat * gamma + beta
    return out, ((x_hat, gamma, inv_std) if train else None)


def batchnorm_backward(dout, cache):
    """dout: (n, m) -> dx: (n, m), dgamma: (m,), dbeta: (m,) (training mode only)."""
    x_hat, gamma, inv_std = cache
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    # The closed form of the derivative through the batch mean and variance.
    dx = (gamma * inv_std / n).astype(dout.dtype, copy=False) * (
        n * dout - dbeta - x_hat * dgamma
    )
    return dx, dgamma, dbeta


def dropout_forward(x, rate, rng=None, *, mask=None):
    """Inverted dropout, in training only: x: (n, m) -> out: (n, m), in place.

    Each unit is kept with probability 1 - rate and scaled by 1 / (1 - rate), so its
    expected output is its input and evaluation, which keeps every unit, needs no
    rescaling (at evaluation there is nothing to call). mask: (n, m) bool of the kept
    units, drawn from `rng` (a np.random.Generator) unless given. cache: (mask, scale).
    """
    scale = 1.0 / (1.0 - rate)
    if mask is None:
        # float32 uniforms whatever x's dtype: a mask only needs P(keep) = 1 - rate
        mask = rng.random(x.shape, dtype=np.float32) >= rate
    x *= mask
    x *= scale
    return x, (mask, scale)


def dropout_backward(dout, cache):
    """dout: (n, m) -> dx: (n, m) = dout * mask / (1 - rate) (modifies dout)."""
    mask, scale = cache
    dout *= mask
    dout *= scale
    return dout


def softmax_cross_entropy(scores, y, label_smoothing=0.0):
    """Mean cross-entropy of integer labels, optionally against smoothed targets.

    scores: (n, k), y: (n,) ints -> loss: float, dscores: (n, k).
    The loss is log-sum-exp minus the correct score, not -log(softmax): a correct class
    scored ~100 below the top (float32) has a probability that underflows to 0, and
    its log would turn a large but finite loss into inf (a false "diverged").
    label_smoothing = eps in [0, 1): the target of row i is (1 - eps) onehot(y_i) +
    eps / k (Szegedy et al. 2016), so the loss is log-sum-exp minus that mix of scores
    and dscores = (softmax - target) / n. eps = 0 is the plain cross-entropy.
    """
    n, k = scores.shape
    rows = np.arange(n)
    probs = scores - scores.max(axis=1, keepdims=True)
    target_score = probs[rows, y]  # shifted score of the correct class
    if label_smoothing:
        checks.fraction("label_smoothing", label_smoothing)
        target_score = (1 - label_smoothing) * target_score + \
            label_smoothing * probs.mean(axis=1)
    np.exp(probs, out=probs)
    sums = probs.sum(axis=1)
    loss = float(np.mean(np.log(sums) - target_score))
    probs /= sums[:, None]
    if label_smoothing:
        probs -= label_smoothing / k
        probs[rows, y] -= 1 - label_smoothing
    else:
        probs[rows, y] -= 1
    probs /= n
    return loss, probs

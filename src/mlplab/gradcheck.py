"""Gradient checking: analytic gradients against centred differences.

Generic, like CS231n's gradient_check.py: a cost is any `f()` of the arrays in
`params`, which are perturbed in place (and restored), one entry at a time. Nothing
here knows about networks; to check one:

    f = lambda: network.cost_and_grads(net, X, y, lam, update_stats=False)[1]
    analytic = network.cost_and_grads(net, X, y, lam, update_stats=False)[2]
    rows = compare(analytic, numerical_gradients(f, net.params))

Work in float64: a step of 1e-5 on a float32 entry is mostly rounding.

A piecewise-smooth cost (ReLU) has no derivative at a kink, and a centred difference
whose two sides straddle one measures a mix of two slopes, so its error says nothing
about the analytic gradient. `kink_crossings` finds those entries from a `piece()`
that names the smooth piece f is on (e.g. the ReLU on/off pattern), and `compare`
leaves them out of the statistics and counts them, instead of loosening the
threshold for every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_H = 1e-5  # step of the centred difference: truncation ~h^2, rounding ~1e-16/h
DEFAULT_THRESHOLD = 1e-6  # largest relative error that passes
# Floor of the relative error's denominator. The numerical gradient carries an
# absolute rounding error near 1e-16 * |f| / h ~ 1e-11; gradients smaller than the
# floor are thus judged on absolute error (|g_a - g_n| <= threshold * eps ~ 1e-12).
DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class Row:
    """The comparison for one parameter array, over its compared entries."""

    name: str
    shape: tuple[int, ...]
    max_rel_err: float  # max |g_a - g_n| / max(eps, |g_a| + |g_n|)
    max_abs_err: float  # max |g_a - g_n|
    share_ok: float  # share of compared entries with relative error <= threshold
    n_excluded: int  # entries left out (numerical difference straddled a kink)
    threshold: float

    @property
    def n_compared(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) - self.n_excluded

    @property
    def ok(self) -> bool:
        """Every compared entry within the threshold, and something was compared."""
        return self.n_compared > 0 and self.max_rel_err <= self.threshold


def _require_float64(params: dict[str, np.ndarray]) -> None:
    for name, p in params.items():
        if p.dtype != np.float64:
            raise ValueError(f"{name} is {p.dtype}: gradient checks need float64 parameters "
                             f"(a step of {DEFAULT_H:g} on a float32 entry is mostly rounding)")


def _perturbed(p: np.ndarray, h: float, evaluate: Callable[[], object]):
    """Yield (index, evaluate() at p[index] + h, evaluate() at p[index] - h) for every
    entry of p, restoring each entry before moving on."""
    for idx in np.ndindex(p.shape):
        old = p[idx]
        try:
            p[idx] = old + h
            plus = evaluate()
            p[idx] = old - h
            minus = evaluate()
        finally:
            p[idx] = old
        yield idx, plus, minus


def numerical_gradients(f: Callable[[], float], params: dict[str, np.ndarray],
                        h: float = DEFAULT_H) -> dict[str, np.ndarray]:
    """(f(p + h e_i) - f(p - h e_i)) / 2h for every entry i of every array in `params`.

    params: name -> float64 array that `f` reads; perturbed in place and restored.
    Returns name -> array of the same shape. Costs 2 calls of f per entry.
    """
    _require_float64(params)
    grads = {}
    for name, p in params.items():
        g = np.zeros_like(p)
        for idx, plus, minus in _perturbed(p, h, f):
            g[idx] = (plus - minus) / (2 * h)
        grads[name] = g
    return grads


def kink_crossings(piece: Callable[[], np.ndarray], params: dict[str, np.ndarray],
                   h: float = DEFAULT_H) -> dict[str, np.ndarray]:
    """Which entries' centred differences straddle a kink of a piecewise-smooth f.

    piece() -> array naming the smooth piece f is on at the current params (e.g. the
    boolean on/off pattern of every ReLU). An entry is flagged when piece() at
    p + h or p - h differs from piece() at p. Returns name -> bool array like params.
    """
    _require_float64(params)
    base = np.asarray(piece())
    crossed = {}
    for name, p in params.items():
        c = np.zeros(p.shape, dtype=bool)
        for idx, plus, minus in _perturbed(p, h, piece):
            c[idx] = not (np.array_equal(plus, base) and np.array_equal(minus, base))
        crossed[name] = c
    return crossed


def relative_error(a: np.ndarray, b: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """|a - b| / max(eps, |a| + |b|), elementwise."""
    return np.abs(a - b) / np.maximum(eps, np.abs(a) + np.abs(b))


def compare(analytic: dict[str, np.ndarray], numeric: dict[str, np.ndarray], *,
            eps: float = DEFAULT_EPS, threshold: float = DEFAULT_THRESHOLD,
            exclude: dict[str, np.ndarray] | None = None) -> list[Row]:
    """One Row per parameter of `numeric`, in its order.

    exclude: name -> bool array of entries to leave out of the statistics (e.g. from
    `kink_crossings`); they are counted in `Row.n_excluded`.
    """
    missing = sorted(set(numeric) - set(analytic))
    if missing:
        raise KeyError(f"no analytic gradient for {missing}")
    rows = []
    for name, g_n in numeric.items():
        g_a = analytic[name]
        if g_a.shape != g_n.shape:
            raise ValueError(f"{name}: analytic gradient shape {g_a.shape} != {g_n.shape}")
        keep = ~exclude[name] if exclude is not None and name in exclude else \
            np.ones(g_n.shape, dtype=bool)
        rel = relative_error(g_a[keep], g_n[keep], eps)
        abs_err = np.abs(g_a[keep] - g_n[keep])
        compared = rel.size > 0
        rows.append(Row(
            name=name, shape=tuple(g_n.shape),
            max_rel_err=float(rel.max()) if compared else float("nan"),
            max_abs_err=float(abs_err.max()) if compared else float("nan"),
            share_ok=float(np.mean(rel <= threshold)) if compared else float("nan"),
            n_excluded=int(keep.size - keep.sum()), threshold=threshold,
        ))
    return rows


def passed(rows: list[Row]) -> bool:
    return all(r.ok for r in rows)


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (readable printed, rendered as an artifact)."""
    lines = ["| parameter | shape | max rel err | max abs err | share ok | kinks | result |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"| {r.name} | {shape} | {r.max_rel_err:.2e} | {r.max_abs_err:.2e} | "
                     f"{r.share_ok:.1%} | {r.n_excluded} | {'ok' if r.ok else 'FAIL'} |")
    return "\n".join(lines)

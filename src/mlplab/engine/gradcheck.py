"""Gradient checking: analytic gradients against centred differences.

Generic, like CS231n's gradient_check.py: a cost is any `f()` of the arrays in
`params`, which are perturbed in place (and restored), one entry at a time. Nothing
here knows about networks; to check one:

    f = lambda: network.cost_and_grads(net, X, y, lam, update_stats=False)[1]
    analytic = network.cost_and_grads(net, X, y, lam, update_stats=False)[2]
    rows = compare(analytic, numerical_gradients(f, net.params))

Work in float64: a step of 1e-5 on a float32 entry is mostly rounding. Even in
float64 the numerical gradient is a reference of limited accuracy, and the defaults
are sized to it (measured on 1- to 9-layer nets, with and without batch norm,
batches of 1 to 100):

- Rounding: f is computed to some tens of ulps, so a centred difference carries an
  absolute error of ~1e-16 * |f| / h, a few 1e-10 at h = 1e-5. A relative error
  means nothing for gradients that small, hence the denominator floor `eps`.
- Truncation: (f(x + h) - f(x - h)) / 2h errs by ~h^2 f''' / 6. Batch norm on tiny
  batches (n = 2) has units whose batch variance is below its epsilon; there the cost
  bends on a scale of ~3e-3 and that error reaches 1e-4. Central differences of
  higher order, which also evaluate f at +-2h and +-3h, cancel the h^2 and h^4 terms:
  order 4 still left 1.3e-6 on the stiffest units, order 6 at most 4e-7.
- Kinks: ReLU makes the cost piecewise smooth. A difference whose two sides straddle
  a kink measures a mix of two slopes and says nothing about the analytic gradient.
  `kink_crossings` finds those entries from a `piece()` naming the smooth piece f is
  on (e.g. the ReLU on/off pattern); `compare` leaves them out and counts them,
  rather than loosening the threshold for every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlplab.engine import checks

DEFAULT_H = 1e-5  # step of the centred difference
# Central-difference weights by order of accuracy: f'(x) ~ sum_k c_k (f(x + k h) -
# f(x - k h)) / h, with error ~h^order. Order 2 is the textbook (f(x+h) - f(x-h)) / 2h.
CENTRAL_WEIGHTS = {2: (1 / 2,), 4: (2 / 3, -1 / 12), 6: (3 / 4, -3 / 20, 1 / 60)}
DEFAULT_ORDER = 6
DEFAULT_THRESHOLD = 1e-6  # largest relative error that passes
# Floor of the relative error's denominator: gradients below it are judged on
# absolute error, |g_a - g_n| <= threshold * eps = 1e-9, above the few 1e-10 of
# rounding error in the numerical gradient.
DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class Row:
    """The comparison for one parameter array, over its compared entries."""

    name: str
    shape: tuple[int, ...]
    max_rel_err: float  # max |g_a - g_n| / max(eps, |g_a| + |g_n|)
    max_abs_err: float  # max |g_a - g_n|
    share_ok: float  # share of compared entries with relative error <= threshold
    n_excluded: int  # entries left out (their difference straddled a kink)
    threshold: float

    @property
    def n_compared(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) - self.n_excluded

    @property
    def ok(self) -> bool:
        """Every compared entry within the threshold, and something was compared."""
        return self.n_compared > 0 and self.max_rel_err <= self.threshold


def check_options(*, d: int, n: int, h: float, order: int, eps: float, threshold: float,
                  jitter: float, seed: int, lam: float | None, bn: bool) -> None:
    """ArgumentError naming the first bad setting of a check (mlplab.engine.checks)."""
    checks.positive_int("d", d)
    checks.positive_int("n", n)
    checks.require(not (bn and n == 1), "n", n, "with bn=true batch norm maps a single "
                   "sample to beta, so nothing before it gets a gradient; allowed n >= 2")
    checks.require(lam is None or lam >= 0, "lam", lam,
                   "allowed null (the top-level lam) or >= 0")
    checks.positive("h", h)
    checks.non_negative_int("seed", seed)
    checks.one_of("order", order, tuple(CENTRAL_WEIGHTS))
    checks.positive("eps", eps)
    checks.positive("threshold", threshold)
    checks.non_negative("jitter", jitter)


def _require_float64(params: dict[str, np.ndarray]) -> None:
    for name, p in params.items():
        # a step of 1e-5 on a float32 entry is mostly rounding
        checks.require(p.dtype == np.float64, name, str(p.dtype),
                       "gradient checks need float64 parameters")


def _each_entry(p: np.ndarray, offsets: tuple[float, ...], evaluate: Callable[[], object]):
    """Yield (index, [evaluate() with p[index] moved by each offset]) for every entry
    of p, restoring the entry before moving on."""
    for idx in np.ndindex(p.shape):
        old = p[idx]
        values = []
        try:
            for offset in offsets:
                p[idx] = old + offset
                values.append(evaluate())
        finally:
            p[idx] = old
        yield idx, values


def largest_step(h: float = DEFAULT_H, order: int = DEFAULT_ORDER) -> float:
    """How far `numerical_gradients` moves an entry: (order / 2) * h."""
    return len(CENTRAL_WEIGHTS[order]) * h


def numerical_gradients(f: Callable[[], float], params: dict[str, np.ndarray],
                        h: float = DEFAULT_H, *, order: int = DEFAULT_ORDER
                        ) -> dict[str, np.ndarray]:
    """Central differences of f for every entry of every array in `params`.

    params: name -> float64 array that `f` reads; perturbed in place and restored.
    order: 2, 4 or 6 (see CENTRAL_WEIGHTS). Returns name -> array of the same shape.
    Costs `order` calls of f per entry.
    """
    _require_float64(params)
    checks.one_of("order", order, tuple(CENTRAL_WEIGHTS))
    weights = CENTRAL_WEIGHTS[order]
    offsets = tuple(s * k * h for k in range(1, len(weights) + 1) for s in (1, -1))
    grads = {}
    for name, p in params.items():
        g = np.zeros_like(p)
        for idx, v in _each_entry(p, offsets, f):
            g[idx] = sum(c * (v[2 * i] - v[2 * i + 1]) for i, c in enumerate(weights)) / h
        grads[name] = g
    return grads


def kink_crossings(piece: Callable[[], np.ndarray], params: dict[str, np.ndarray],
                   reach: float) -> dict[str, np.ndarray]:
    """Which entries' differences straddle a kink of a piecewise-smooth f.

    piece() -> array naming the smooth piece f is on at the current params (e.g. the
    boolean on/off pattern of every ReLU). An entry is flagged when piece() at
    p +- reach differs from piece() at p; pass `largest_step(h, order)`.
    Returns name -> bool array shaped like each parameter.
    """
    _require_float64(params)
    base = np.asarray(piece())
    crossed = {}
    for name, p in params.items():
        c = np.zeros(p.shape, dtype=bool)
        for idx, (plus, minus) in _each_entry(p, (reach, -reach), piece):
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
        keep = np.ones(g_n.shape, dtype=bool)
        if exclude is not None and name in exclude:
            keep &= ~exclude[name]
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
        result = "ok" if r.ok else "FAIL" if r.n_compared else "FAIL (every entry at a kink)"
        lines.append(f"| {r.name} | {shape} | {r.max_rel_err:.2e} | {r.max_abs_err:.2e} | "
                     f"{r.share_ok:.1%} | {r.n_excluded} | {result} |")
    return "\n".join(lines)

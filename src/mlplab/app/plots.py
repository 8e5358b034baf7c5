"""Figures: training curves like the reports', class templates of a 1-layer W, and the
report's comparisons (runs side by side, the initialisation grid, a search's results)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in sweeps

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mlplab.engine.data import rows_to_images  # noqa: E402

CURVES = (("cost", "cost"), ("loss", "loss"), ("acc", "accuracy"))


def _save(fig, path, title: str = "", dpi: int = 90, tight: bool = True) -> None:
    if title:
        fig.suptitle(title)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_curves(history: list[dict], path, title: str = "") -> None:
    """Cost, loss and accuracy vs update step, train vs validation, side by side."""
    global _curves
    if _curves is None:
        _curves = _CurvesFigure()
    _curves.draw(history, path, title)


class _CurvesFigure:
    """The curves figure, built once per process and redrawn with each run's data.

    Every run draws it, and building it (axes, ticks, legends) was half of its cost;
    the tracking writer draws one per trial of a sweep. Fixed margins for the same
    reason: tight_layout would triple the cost.
    """

    def __init__(self):
        self.fig, self.axes = plt.subplots(1, len(CURVES), figsize=(13, 3.6))
        self.lines = {}
        for ax, (key, label) in zip(self.axes, CURVES, strict=True):
            for split, style in (("train", "-"), ("val", "--")):
                (self.lines[key, split],) = ax.plot(
                    [], [], style, label="training" if split == "train" else "validation")
            _label_panel(ax, label)
            ax.legend()
        self.fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.88, wspace=0.25)
        self.title = self.fig.suptitle("")

    def draw(self, history: list[dict], path, title: str) -> None:
        steps = [r["step"] for r in history]
        for (key, split), line in self.lines.items():
            line.set_data(steps, [r[f"{split}_{key}"] for r in history])
        for ax in self.axes:
            ax.relim()
            ax.autoscale_view()
        self.title.set_text(title)
        self.fig.savefig(path, dpi=110)


_curves: _CurvesFigure | None = None


def class_templates(W: np.ndarray, image_shape) -> np.ndarray:
    """W: (d, k) of a 1-layer network -> (k, H, W, C) images in [0, 1], one per class,
    each scaled on its own range, as the reports show them."""
    imgs = rows_to_images(W.T, image_shape).astype(np.float64)
    lo = imgs.min(axis=(1, 2, 3), keepdims=True)
    hi = imgs.max(axis=(1, 2, 3), keepdims=True)
    return (imgs - lo) / np.maximum(hi - lo, np.finfo(np.float64).tiny)


def plot_class_templates(W: np.ndarray, image_shape, class_names, path) -> None:
    imgs = class_templates(W, image_shape)
    fig, axes = plt.subplots(1, len(imgs), figsize=(1.4 * len(imgs), 1.8))
    for ax, img, name in zip(axes, imgs, class_names, strict=True):
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    _save(fig, path, dpi=110)


def _curve_panel(ax, history: list[dict], key: str, ylabel: str) -> None:
    """Training (solid) and validation (dashed) `key` vs update step on one axis."""
    steps = [r["step"] for r in history]
    for split, style in (("train", "-"), ("val", "--")):
        ax.plot(steps, [r[f"{split}_{key}"] for r in history], style,
                label="training" if split == "train" else "validation")
    _label_panel(ax, ylabel)


def _label_panel(ax, ylabel: str) -> None:
    ax.set_xlabel("update step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_side_by_side(histories: dict[str, list[dict]], path, title: str = "",
                      curves=(("loss", "loss"), ("acc", "accuracy"))) -> None:
    """One column per run, one row per curve (shared y scale along a row), so runs
    that differ in one knob (with vs without BN) compare at a glance."""
    ncols, nrows = len(histories), len(curves)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows),
                             sharey="row", squeeze=False)
    for col, (name, history) in enumerate(histories.items()):
        for row, (key, label) in enumerate(curves):
            _curve_panel(axes[row, col], history, key, label)
        axes[0, col].set_title(name, fontsize=10)
    axes[0, 0].legend()
    _save(fig, path, title, dpi=90)


def plot_curve_grid(grid: dict[tuple[str, str], list[dict]], path, title: str = "",
                    curve=("loss", "loss")) -> None:
    """grid: {(row label, column label): history} -> one panel per cell, rows and
    columns in first-seen order; a missing cell is left blank. For the
    initialisation grid: rows are the weight std, columns without / with BN."""
    rows = list(dict.fromkeys(r for r, _ in grid))
    cols = list(dict.fromkeys(c for _, c in grid))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 2.8 * len(rows)),
                             sharex=True, squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            if (row, col) not in grid:
                ax.axis("off")
                continue
            _curve_panel(ax, grid[row, col], *curve)
            ax.set_title(f"{row}, {col}", fontsize=10)
    axes[0, 0].legend()
    _save(fig, path, title, dpi=90)


def plot_search(trials: list[dict], param: str, path, title: str = "") -> None:
    """Objective (validation accuracy) vs a searched parameter, one marker series per
    stage of a coarse-to-fine search; log x when every value is positive.
    trials: [{"stage": ..., param: float, "value": float}, ...]."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for stage in dict.fromkeys(t["stage"] for t in trials):
        pts = sorted((t[param], t["value"]) for t in trials if t["stage"] == stage)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"stage {stage}", alpha=0.8)
    if all(t[param] > 0 for t in trials):
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title)
    _save(fig, path)


SPAN_PAD = 0.05  # share of a search stage's span left blank at each side


def plot_search_stage(points: list[tuple[float, float]], best: list[tuple[float, float]],
                      failed: list[float], path, *, param: str, span: tuple[float, float],
                      log_x: bool, ylabel: str = "validation accuracy",
                      title: str = "", pruned: list[tuple[float, float]] = ()) -> None:
    """points: (parameter value, objective) of the completed trials; `best` (a subset)
    is ringed; `pruned`: (value, objective when stopped) of pruned trials, hollow;
    `failed` parameter values are crosses on the bottom edge, so a region that
    diverges shows up. The x axis is the stage's searched `span`."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if points:
        ax.plot(*zip(*sorted(points), strict=True), "o", color="C0", label="trial")
    if pruned:
        ax.plot(*zip(*sorted(pruned), strict=True), "o", markerfacecolor="none",
                color="C7", label="pruned (when stopped)")
    if best:
        ax.plot(*zip(*best, strict=True), "o", markersize=13, markerfacecolor="none",
                markeredgecolor="C3", markeredgewidth=2, label=f"best {len(best)}")
    if failed:
        ax.plot(failed, [0.0] * len(failed), "x", color="C7", transform=ax.get_xaxis_transform(),
                clip_on=False, label="failed")
    low, high = span
    if log_x:
        ax.set_xscale("log")
        pad = (high / low) ** SPAN_PAD
        ax.set_xlim(low / pad, high * pad)
    elif high > low:
        pad = (high - low) * SPAN_PAD
        ax.set_xlim(low - pad, high + pad)
    ax.set_xlabel(param)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_pareto(points: list[tuple[float, float]], front: list[tuple[float, float]], path,
                *, labels: tuple[str, str], chosen: tuple[float, float] | None = None,
                title: str = "") -> None:
    """Two objectives of a search's complete trials: every trial a dot, the Pareto
    front joined as a staircase, the member the final step retrains ringed."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if points:
        ax.plot(*zip(*points, strict=True), "o", color="C7", alpha=0.6, label="trial")
    if front:
        ax.step(*zip(*sorted(front), strict=True), "o-", where="post", color="C0",
                label=f"Pareto front ({len(front)})")
    if chosen is not None:
        ax.plot(*chosen, "o", markersize=13, markerfacecolor="none", markeredgecolor="C3",
                markeredgewidth=2, label="retrained")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)

"""The figure a search stage leaves on its parent run: objective vs one parameter."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: sweeps run on servers

import matplotlib.pyplot as plt  # noqa: E402

SPAN_PAD = 0.05  # share of the searched span left blank at each side


def plot_stage(points: list[tuple[float, float]], best: list[tuple[float, float]],
               failed: list[float], path, *, param: str, span: tuple[float, float],
               log_x: bool, ylabel: str = "validation accuracy", title: str = "") -> None:
    """points: (parameter value, objective) of the completed trials; `best` (a subset)
    is ringed; `failed` parameter values are crosses on the bottom edge, so a region
    that diverges shows up. The x axis is the stage's searched `span`."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if points:
        ax.plot(*zip(*sorted(points), strict=True), "o", color="C0", label="trial")
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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

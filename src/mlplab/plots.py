"""Figures: training curves like the reports', and the class templates of a 1-layer W."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in sweeps

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mlplab.data import rows_to_images  # noqa: E402

CURVES = (("cost", "cost"), ("loss", "loss"), ("acc", "accuracy"))


def plot_curves(history: list[dict], path, title: str = "") -> None:
    """Cost, loss and accuracy vs update step, train vs validation, side by side."""
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        for split, style in (("train", "-"), ("val", "--")):
            ax.plot(steps, [r[f"{split}_{key}"] for r in history], style,
                    label="training" if split == "train" else "validation")
        ax.set_xlabel("update step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

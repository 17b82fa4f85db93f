"""Matplotlib figures for a run (learning curves, confusion matrix, sample grid) and a sweep (curves, bars).

Made once at the end of a run, never per epoch. Each function returns a Figure; callers save and close it.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist_exp.data import CLASSES  # noqa: E402


def learning_curves(history: list[dict], best_epoch: int, title: str = ""):
    """Train/valid loss and valid accuracy per epoch, the best checkpoint's epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(epochs, [h["valid_loss"] for h in history], "o-", label="valid loss")
    ax_acc.plot(epochs, [h["valid_acc"] for h in history], "o-", color="tab:green", label="valid accuracy")
    for ax, name in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy")):
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best checkpoint (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Learning curves")
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, title: str = ""):
    """Counts of true class (rows) vs predicted class (columns) on the test set."""
    counts = np.zeros((10, 10), dtype=int)
    np.add.at(counts, (y_true, y_pred), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(counts, cmap="Blues")
    for i in range(10):
        for j in range(10):
            ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=8,
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(10), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(10), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(1, counts.sum())
    ax.set_title(title or f"Test confusion matrix (accuracy {accuracy:.4f})")
    fig.tight_layout()
    return fig


def sample_grid(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray):
    """The notebook's 4x8 grid of test images, titled predicted/true; wrong predictions in red."""
    fig, axes = plt.subplots(4, 8, figsize=(16, 8.5))
    for ax, img, t, p in zip(axes.flat, images, y_true, y_pred):
        ax.imshow(img.reshape(28, 28), cmap="gray")
        ax.set_title(f"{CLASSES[p]}\n({CLASSES[t]})", fontsize=9, color="black" if p == t else "red")
        ax.axis("off")
    fig.suptitle("Test samples: predicted (true); wrong in red")
    fig.tight_layout()
    return fig


def sweep_curves(curves: dict[str, list[tuple[int, float]]], metric: str = "valid_acc"):
    """One line per job: `metric` per epoch, all jobs of a sweep overlaid."""
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{metric} per epoch, every job of the sweep")
    fig.tight_layout()
    return fig


def sweep_bars(names: list[str], values: list[float], metric: str = "test_acc"):
    """`metric` per job, best on top."""
    order = np.argsort(values)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    ax.barh([names[i] for i in order], [values[i] for i in order], color="tab:blue")
    for y, i in enumerate(order):
        ax.text(values[i], y, f" {values[i]:.4f}", va="center", fontsize=8)
    lo = min(values) if values else 0
    ax.set_xlim(max(0.0, lo - 0.05), min(1.0, max(values, default=1) + 0.03))
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} per job")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)

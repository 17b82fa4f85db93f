"""Matplotlib figures for a run (learning curves, confusion matrix, sample grid) and a sweep (curves, bars).

Made once at the end of a run, never per epoch. The sweep's figures and the learning curves are functions that
return a Figure (`render` draws it once into an RGBA array and closes it); the confusion matrix and the sample grid
return the RGBA array themselves, from a figure kept for the next run's (`Reused`). Callers write PNGs (`png`) and,
where useful, show them in TensorBoard.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Glyphs drawn without hinting: text, most of what these figures cost to draw, draws 17-25 % faster and looks the same
# at 100 dpi (hinting snaps outlines to the pixel grid)
FAST_TEXT = {"text.hinting": "none"}

# Fashion-MNIST's labels 0-9 (this module stays free of torch: the tracking process draws the plots)
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle Boot")


def learning_curves(history: list[dict], best_epoch: int, title: str = ""):
    """Train/valid loss and valid accuracy per epoch, the best checkpoint's epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(epochs, [h["valid_loss"] for h in history], "o-", label="valid loss")
    ax_acc.plot(epochs, [h["valid_acc"] for h in history], "o-", color="tab:green", label="valid accuracy")
    losses = [v for h in history for v in (h["train_loss"], h["valid_loss"]) if np.isfinite(v) and v > 0]
    if losses and max(losses) > 1000 * min(losses):  # a diverging run: its last loss would flatten the rest
        ax_loss.set_yscale("log")
    for ax, name in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy")):
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best checkpoint (epoch {best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.25
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Learning curves")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.22)  # fixed: tight_layout costs
    # as much as drawing, and a sweep draws three figures per job
    return fig


class Reused:
    """A per-run figure drawn for run after run in one process (the tracking process draws every job's figures of
    a sweep): what all runs share (axes, class names, the test images) is drawn once and kept, and each run draws
    only its own artists, made `animated` so a full draw skips them, over a copy of that (matplotlib's blitting;
    ~2x faster per figure, benchmarks/RESULTS.md)."""

    def __init__(self, fig, artists: list):
        self.fig, self.artists, self.background = fig, artists, None
        for a in artists:
            a.set_animated(True)

    def image(self, dpi: int = 100) -> np.ndarray:
        """The figure with the current run's artists, as an RGBA uint8 array (H, W, 4)."""
        canvas = self.fig.canvas
        with matplotlib.rc_context(FAST_TEXT):
            if self.background is None:
                self.fig.set_dpi(dpi)
                canvas.draw()  # everything but the animated artists
                self.background = canvas.copy_from_bbox(self.fig.bbox)
            else:
                canvas.restore_region(self.background)
            for a in self.artists:
                self.fig.draw_artist(a)
        return np.asarray(canvas.buffer_rgba()).copy()


class ConfusionMatrix(Reused):
    """Counts of true class (rows) vs predicted class (columns) on the test set."""

    def __init__(self):
        fig, ax = plt.subplots(figsize=(8, 7))
        self.counts = ax.imshow(np.zeros((10, 10)), cmap="Blues")
        self.numbers = [ax.text(j, i, "", ha="center", va="center", fontsize=8) for i in range(10) for j in range(10)]
        ax.set_xticks(range(10), CLASSES, rotation=45, ha="right")
        ax.set_yticks(range(10), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        self.title = ax.set_title(" ")
        fig.subplots_adjust(left=0.16, right=0.98, bottom=0.16, top=0.94)
        # the frame is redrawn over the counts, as a full draw puts it
        super().__init__(fig, [self.counts, *ax.spines.values(), *self.numbers, self.title])

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray, title: str = "") -> np.ndarray:
        counts = np.zeros((10, 10), dtype=int)
        np.add.at(counts, (y_true, y_pred), 1)
        self.counts.set_data(counts)
        self.counts.set_clim(counts.min(), counts.max())
        for text, n in zip(self.numbers, counts.flat):
            text.set_text(str(n))
            text.set_color("white" if n > counts.max() / 2 else "black")
        accuracy = np.trace(counts) / max(1, counts.sum())
        self.title.set_text(title or f"Test confusion matrix (accuracy {accuracy:.4f})")
        return self.image()


class SampleGrid(Reused):
    """The notebook's 4x8 grid of test images, titled predicted/true; wrong predictions in red.

    One image (a mosaic of the tiles) in one Axes: as readable as 32 subplots, and several times faster to draw.
    The images are the background (every run shows the same ones); each run draws its titles.
    """

    def __init__(self, images: np.ndarray, cols: int = 8):
        self.images = images.copy()
        rows = -(-len(images) // cols)
        tile, gap_x, gap_y = 28, 6, 22  # gap_y leaves room for the two-line title above each tile
        height, width = rows * (tile + gap_y), cols * tile + (cols - 1) * gap_x
        mosaic = np.ones((height, width))  # white background
        fig, ax = plt.subplots(figsize=(12, 9.5))
        self.titles = []
        for k, img in enumerate(images):
            r, c = divmod(k, cols)
            top, left = r * (tile + gap_y) + gap_y, c * (tile + gap_x)
            mosaic[top: top + tile, left: left + tile] = img.reshape(tile, tile)
            self.titles.append(ax.text(left + tile / 2, top - 1.5, "", ha="center", va="bottom", fontsize=9))
        ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.axis("off")
        fig.suptitle("Test samples: predicted (true); wrong in red")
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.94)
        super().__init__(fig, self.titles)

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        """This run's titles over the grid's images (self.images, in order)."""
        for text, t, p in zip(self.titles, y_true, y_pred):
            text.set_text(f"{CLASSES[p]}\n({CLASSES[t]})")
            text.set_color("black" if p == t else "red")
        return self.image()


_reused: dict[str, Reused] = {}  # this process's per-run figures, kept between runs


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, title: str = "") -> np.ndarray:
    """The test set's confusion matrix as an RGBA array (the figure is kept for the next run's)."""
    if "confusion_matrix" not in _reused:
        _reused["confusion_matrix"] = ConfusionMatrix()
    return _reused["confusion_matrix"](y_true, y_pred, title)


def sample_grid(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """The 4x8 test-sample grid as an RGBA array (kept for the next run's, while the images stay the same)."""
    grid = _reused.get("sample_grid")
    if grid is None or not np.array_equal(images, grid.images):
        if grid is not None:
            plt.close(grid.fig)
        grid = _reused["sample_grid"] = SampleGrid(images)
    return grid(y_true, y_pred)


def job_labels(names: list[str]) -> tuple[list[str], str]:
    """Jobs' names (their overrides) without the overrides every job shares, and those shared ones: a plot labels
    each job by what sets it apart (`lr=0.004 seed=2`, not `... train.epochs=1 data.batch_size=100` on every bar)."""
    tokens = [str(n).split() for n in names]
    shared = [t for t in tokens[0] if all(t in ts for ts in tokens[1:])] if len(tokens) > 1 else []
    labels = [" ".join(t for t in ts if t not in shared) or str(n) for ts, n in zip(tokens, names)]
    return labels, " ".join(shared)


def _sweep_title(fig, text: str, shared: str) -> None:
    """A sweep figure's title over the whole figure (long labels never push it off the edge), what every job
    shares below it."""
    fig.suptitle(text + (f"\nevery job: {shared}" if shared else ""), fontsize=11)


def sweep_curves(curves: dict[str, list[tuple[int, float]]], metric: str = "valid_acc", highlight: int = 10):
    """`metric` per epoch for every job of a sweep, given in rank order (best first): the top `highlight` in
    colour with a legend beside the axes, the rest as thin grey lines (dots for one-epoch jobs), so 256 jobs stay
    readable."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    labels, shared = job_labels(list(curves))
    items = list(zip(labels, curves.values()))
    for _, points in items[highlight:][::-1]:
        if points:
            ax.plot(*zip(*points), color="0.75", linewidth=0.6, marker=".", markersize=3, zorder=1)
    for name, points in items[:highlight]:
        if points:
            ax.plot(*zip(*points), marker=".", label=name, zorder=2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = {e for _, points in items for e, _ in points}
    if len(epochs) == 1:  # one epoch: a column of dots over its tick, not over a range of 0.945-1.05
        ax.set_xlim(min(epochs) - 1, min(epochs) + 1)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if any(points for _, points in items[:highlight]):  # a sweep whose jobs all stopped before an epoch has none
        # beside the axes: inside, it hid the curves under it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  title=f"top {min(highlight, len(items))} of {len(items)}\n(ranked on validation)"
                  if len(items) > highlight else None, title_fontsize=7)
    _sweep_title(fig, f"{metric} per epoch, every job of the sweep", shared)
    fig.tight_layout()
    return fig


def sweep_bars(names: list[str], values: list[float], metric: str = "test_acc", limit: int = 30):
    """`metric` of each job, in the given rank order (best on top; at most `limit` jobs)."""
    labels, shared = job_labels(names)
    shown = list(zip(labels, values))[:limit]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(shown) + 1.8))
    y = np.arange(len(shown))[::-1]
    ax.barh(y, [v for _, v in shown], color="tab:blue")
    ax.set_yticks(y, [n for n, _ in shown])
    for yi, (_, v) in zip(y, shown):
        ax.text(v, yi, f" {v:.4f}", va="center", fontsize=8)
    lo, hi = min((v for _, v in shown), default=0), max((v for _, v in shown), default=1)
    left = max(0.0, lo - 0.05)
    ax.set_xlim(left, hi + 0.15 * max(hi - left, 0.01))  # room for the value printed after the longest bar
    ax.set_xlabel(metric)
    more = f", top {len(shown)} of {len(names)}" if len(names) > limit else ""
    _sweep_title(fig, f"{metric} per job, ranked on validation data (best on top{more})", shared)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def render(fig, dpi: int = 100) -> np.ndarray:
    """Draw `fig` once into an RGBA uint8 array (H, W, 4) and close it."""
    fig.set_dpi(dpi)
    with matplotlib.rc_context(FAST_TEXT):
        fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return image


def image(kind: str, *args) -> np.ndarray:
    """plots.<kind>(*args) as an RGBA array: a per-run figure (confusion_matrix, sample_grid) as it returns it, a
    Figure rendered and closed."""
    out = globals()[kind](*args)
    return out if isinstance(out, np.ndarray) else render(out)


def png(image: np.ndarray) -> bytes:
    """An RGBA image as PNG bytes, RGB (the figures are opaque): zlib level 1 writes ~1.6x faster than the default
    level 6 for files ~10 % larger."""
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(image[..., :3]).save(out, format="png", compress_level=1)
    return out.getvalue()


def save(fig, path) -> None:
    """Write `fig` as a PNG and close it."""
    Path(path).write_bytes(png(render(fig)))

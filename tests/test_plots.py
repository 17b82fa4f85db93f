"""Figures: the per-run figures kept between runs (plots.Reused) draw each run as a fresh figure would, never
with an earlier run's numbers or titles left over, and as matplotlib's full draw does; the sweep's figures stay
readable at 64 jobs; learning curves show whole epochs and a diverging loss on a log scale."""
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from fmnist_exp import plots

rng = np.random.default_rng(0)
Y = rng.integers(0, 10, 2000)
PREDICTIONS = [np.where(rng.random(2000) < p, Y, rng.integers(0, 10, 2000)) for p in (0.9, 0.3)]
IMAGES = rng.random((32, 784)).astype(np.float32)


def full_draw(figure: plots.Reused) -> np.ndarray:
    """The figure drawn the ordinary way (no blitting), as an RGBA array."""
    for a in figure.artists:
        a.set_animated(False)
    figure.fig.set_dpi(100)
    with matplotlib.rc_context(plots.FAST_TEXT):
        figure.fig.canvas.draw()
    return np.asarray(figure.fig.canvas.buffer_rgba()).copy()


@pytest.mark.parametrize("kind", ["confusion_matrix", "sample_grid"])
def test_a_reused_figure_draws_each_run_as_a_fresh_one(kind):
    make = {"confusion_matrix": lambda: plots.ConfusionMatrix(), "sample_grid": lambda: plots.SampleGrid(IMAGES)}[kind]
    args = {"confusion_matrix": lambda p: (Y, p), "sample_grid": lambda p: (Y[:32], p[:32])}[kind]
    reused = make()
    first, second = (reused(*args(p)) for p in PREDICTIONS)
    fresh = make()
    alone = fresh(*args(PREDICTIONS[1]))
    assert np.array_equal(second, alone)  # nothing of the first run is left
    assert not np.array_equal(first, second)
    assert np.array_equal(full_draw(fresh), alone)  # blitting draws exactly what a full draw draws
    if kind == "sample_grid":  # wrong predictions are titled in red: the worse run has far more red
        red = lambda im: int(((im[..., 0] > 200) & (im[..., 1] < 80) & (im[..., 2] < 80)).sum())
        assert red(second) > red(first) > 0 or red(first) == 0 < red(second)


def test_module_functions_keep_one_figure_per_kind_and_redraw_for_new_images(tmp_path):
    a = plots.confusion_matrix(Y, PREDICTIONS[0])
    assert plots.confusion_matrix(Y, PREDICTIONS[0]).tobytes() == a.tobytes()
    grid = plots.sample_grid(IMAGES, Y[:32], PREDICTIONS[0][:32])
    other = plots.sample_grid(IMAGES[::-1].copy(), Y[:32], PREDICTIONS[0][:32])  # other images: a new figure
    assert grid.shape == other.shape and not np.array_equal(grid, other)
    path = tmp_path / "cm.png"
    path.write_bytes(plots.png(a))
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (a.shape[1], a.shape[0])
        assert np.array_equal(np.asarray(im), a[..., :3])


NAMES = [f"optimizer.lr={lr} optimizer.weight_decay={wd} train.seed={s} train.epochs=1 data.batch_size=100"
         for lr in (0.001, 0.002, 0.004, 0.008) for wd in (0, 0.0001, 0.001, 0.01) for s in range(4)]  # 64 jobs


def inside(fig, artist) -> bool:
    box, frame = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_sweep_plots_label_jobs_by_what_sets_them_apart_and_keep_every_text_in_the_figure():
    """64 jobs: the bars' title ran off the figure, a value past the axes' edge, every label repeated the overrides
    all jobs share; one-epoch jobs past the top 10 were invisible (lines of one point), the legend hid curves."""
    labels, shared = plots.job_labels(NAMES)
    assert shared == "train.epochs=1 data.batch_size=100" and labels[0] == "optimizer.lr=0.001 " \
        "optimizer.weight_decay=0 train.seed=0"
    values = list(np.linspace(0.85, 0.80, len(NAMES)))
    fig = plots.sweep_bars(NAMES, values)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert "top 30 of 64" in fig._suptitle.get_text() and shared in fig._suptitle.get_text()
    assert inside(fig, fig._suptitle) and all(inside(fig, t) for t in ax.get_yticklabels())
    axes_box = ax.get_window_extent()
    assert all(t.get_window_extent().x1 <= axes_box.x1 for t in ax.texts)  # each value inside the axes
    top = int(np.argmax(ax.get_yticks()))
    assert ax.get_yticklabels()[top].get_text() == labels[0]  # best on top, without the shared overrides
    plt.close(fig)
    fig = plots.sweep_curves({n: [(1, v)] for n, v in zip(NAMES, values)})
    fig.canvas.draw()
    ax = fig.axes[0]
    assert len(ax.lines) == 64 and all(line.get_marker() not in (None, "None", "") for line in ax.lines)
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1 and inside(fig, ax.get_legend())  # beside the axes, in the figure
    assert [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] == [0, 1, 2]
    plt.close(fig)


def test_learning_curves_show_whole_epochs_and_a_diverging_loss_on_a_log_scale():
    history = [{"epoch": e, "train_loss": loss, "valid_loss": loss, "valid_acc": 0.1} for e, loss in
               ((1, 2.3), (2, 2.1), (3, 6e11))]
    fig = plots.learning_curves(history, best_epoch=2)
    ax_loss, ax_acc = fig.axes
    assert ax_loss.get_yscale() == "log" and ax_acc.get_yscale() == "linear"
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax_loss.get_xticks())
    plt.close(fig)
    calm = plots.learning_curves([{**h, "train_loss": 1.0, "valid_loss": 1.0} for h in history], best_epoch=2)
    assert calm.axes[0].get_yscale() == "linear"
    plt.close(calm)

"""The per-run figures kept between runs (plots.Reused): a run's image is exactly what a fresh figure draws, never
with an earlier run's numbers or titles left over, and the same as matplotlib's full draw of that figure."""
import matplotlib
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

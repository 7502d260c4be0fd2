"""Loss-gap figures: loss curves, the absolute and the relative gap panel, the bands."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dydit_lab.analysis.loss_gap import loss_gap, per_run_loss, seed_gap  # noqa: E402
from dydit_lab.viz.gap_plots import NO_SEED_BAND, plot_gap_panels, plot_loss_curves  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

TS = range(0, 1000, 200)


@pytest.fixture(scope="module")
def runs():
    """Per-run losses of two tiny runs per size on 3 random images, 5 timesteps, 3 samples each."""
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    checkpoints = {"S": [tiny_model(0), tiny_model(1)], "L": [tiny_model(2), tiny_model(3)]}
    return per_run_loss(checkpoints, images, torch.tensor([1, 2, 3]), timesteps=TS, samples_per_t=3,
                        progress=False)


@pytest.fixture
def one_run(runs):
    return runs[runs["run"] == 0].drop(columns="run")  # per_timestep_loss's format


def _labelled(ax):
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def _legend_texts(fig):
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_plot_loss_curves_from_long_df(one_run):
    fig = plot_loss_curves(one_run, "S", "L")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    top, bottom = fig.axes
    assert top.get_ylabel() and _labelled(bottom)  # x is shared: labelled once, below
    assert top.get_yscale() == "log"
    assert "timestep t" in bottom.get_xlabel()
    assert "gap" in bottom.get_ylabel()
    assert NO_SEED_BAND in _legend_texts(fig) and len(_bands(bottom)) == 1


def test_plot_loss_curves_from_gap_df_into_given_axes(one_run):
    fig, axes = plt.subplots(1, 2)
    out = plot_loss_curves(loss_gap(one_run, "S", "L", smooth=3), axes=axes, relative=True)
    assert out is fig and len(fig.axes) == 2
    assert "relative" in axes[1].get_ylabel()


def test_plot_loss_curves_needs_a_pair(one_run):
    three = one_run.assign(model=one_run["model"].where(one_run["t"] > 0, "X"))
    with pytest.raises(ValueError):
        plot_loss_curves(three)


def test_plot_gap_panels_two_runs_per_size_draw_the_seed_band(runs):
    fig = plot_gap_panels(runs, "S", "L", smooth=3, title="gap")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    loss, absolute, relative = fig.axes
    assert loss.get_yscale() == "log" and "MSE" in loss.get_ylabel()
    assert absolute.get_ylabel() == "loss gap (small − large)" and _labelled(absolute)
    assert relative.get_ylabel() == "relative gap (small − large) / large" and _labelled(relative)
    assert "absolute" in absolute.get_title() and "relative" in relative.get_title()
    texts = _legend_texts(fig)
    assert "between seeds: min–max of 4 small × large pairs of runs" in texts
    assert NO_SEED_BAND not in texts and "S (mean of 2 runs)" in texts
    for ax in (absolute, relative):
        assert len(_bands(ax)) == 2  # between-seed range and evaluation-noise interval
        assert len(ax.lines[0].get_xdata()) == len(TS)  # one point per evaluated timestep
    assert fig._suptitle.get_text() == "gap"


def test_plot_gap_panels_seed_band_follows_seed_gap(runs):
    gap = seed_gap(runs, "S", "L")
    fig = plot_gap_panels(gap)
    _, absolute, relative = fig.axes
    seed_band, _ = _bands(absolute)
    lo_hi = seed_band.get_paths()[0].vertices[:, 1]
    assert lo_hi.min() == pytest.approx(gap["seed_lo"].min())
    assert lo_hi.max() == pytest.approx(gap["seed_hi"].max())
    rel_band, _ = _bands(relative)
    assert rel_band.get_paths()[0].vertices[:, 1].max() == pytest.approx(gap["relative_seed_hi"].max())


def test_plot_gap_panels_one_run_per_size_say_there_is_no_band(one_run):
    fig = plot_gap_panels(one_run, "S", "L")
    assert len(fig.axes) == 3
    texts = _legend_texts(fig)
    assert NO_SEED_BAND in texts and not any(t.startswith("between seeds") for t in texts)
    assert "S" in texts and "L" in texts
    for ax in fig.axes[1:]:
        assert len(_bands(ax)) == 1  # the evaluation-noise interval only

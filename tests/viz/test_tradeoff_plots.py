"""The trade-off figure: DyDiT medians with seed ranges, reference lines, control points."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dydit_lab.analysis.tradeoff import seed_summary  # noqa: E402
from dydit_lab.viz.tradeoff_plots import plot_loss_ratios, plot_recipe_curves, plot_tradeoff  # noqa: E402


def test_plot_tradeoff_draws_ranges_references_and_controls():
    runs = pd.DataFrame({"target_ratio": [0.5, 0.5, 0.7, 0.7], "fd_lenet": [20.0, 30.0, 18.0, 19.0],
                         "accuracy": [0.8, 0.7, 0.85, 0.86], "gflops_per_image": [3.0, 3.2, 4.0, 4.1],
                         "block_flops_fraction": [0.5, 0.5, 0.7, 0.7]})
    static = pd.DataFrame({"gflops_per_image": [5.5, 1.1], "fd_lenet": [21.0, 45.0], "accuracy": [0.84, 0.8]})
    control = seed_summary(runs.assign(target_ratio=1.0))
    fig = plot_tradeoff(seed_summary(runs), references={"DiT-lab-L, fewer steps": static},
                        controls={"no routers": control})
    fd_axes = fig.axes[0]
    reference = [line for line in fd_axes.get_lines() if line.get_label() == "DiT-lab-L, fewer steps"][0]
    assert list(reference.get_xdata()) == [1.1, 5.5]  # sorted by compute
    texts = [t.get_text() for t in fd_axes.texts]
    assert texts == ["λ = 0.5 (2)", "λ = 0.7 (2)"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["DiT-lab-L, fewer steps", "DyDiT (median of seeds)", "no routers"]
    # The λ = 0.5 bar spans the seeds' FD range 20-30 around the median 25.
    bars = fd_axes.containers[0]
    segments = bars.lines[2][1].get_segments()
    assert [tuple(s[:, 1]) for s in segments][0] == (20.0, 30.0)
    plt.close(fig)


def test_plot_loss_ratios_draws_each_model_over_the_reference():
    rows = []
    for t in (100, 500, 900):
        for sample in range(4):
            base = 0.01 * (1 + sample) / (1 + t / 100)
            rows += [("parent", t, sample, base), ("twice", t, sample, 2 * base),
                     ("noisy", t, sample, base * (1 + 0.1 * (sample - 1.5)))]
    table = pd.DataFrame(rows, columns=["model", "t", "sample", "mse"])
    fig = plot_loss_ratios(table, reference="parent")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"twice", "noisy"}
    assert list(lines["twice"].get_ydata()) == [2.0, 2.0, 2.0]
    assert len(ax.collections) == 2 and ax.get_yscale() == "log"  # one band per model
    only = plot_loss_ratios(table, reference="parent", names=["noisy"])
    assert [line.get_label() for line in only.axes[0].get_lines() if not line.get_label().startswith("_")] == ["noisy"]
    with pytest.raises(ValueError, match="no models"):
        plot_loss_ratios(table[table.model == "parent"], reference="parent")
    plt.close("all")


def test_plot_recipe_curves_labels_seed_counts_and_each_k():
    runs = pd.DataFrame({"coarse_steps": [0, 0, 24, 24], "fd_lenet": [6.0, 8.0, 15.0, 30.0],
                         "accuracy": [0.94, 0.93, 0.9, 0.8], "gflops_per_image": [5.5, 5.5, 3.5, 3.5]})
    one = seed_summary(runs.iloc[[0, 2]], by="coarse_steps")
    static = pd.DataFrame({"gflops_per_image": [5.5, 1.1], "fd_lenet": [6.0, 16.0], "accuracy": [0.94, 0.96]})
    fig = plot_recipe_curves({"two seeds": seed_summary(runs, by="coarse_steps"), "one": one},
                             references={"parent, fewer steps": static})
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["parent, fewer steps", "two seeds (2 seeds)", "one (1 seed)"]
    fd_axes = fig.axes[0]
    assert fd_axes.get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"
    assert [t.get_text() for t in fd_axes.texts] == ["k = 0", "k = 24"]
    segments = fd_axes.containers[0].lines[2][1].get_segments()  # the two-seed curve's FD bars, by compute
    assert sorted(tuple(s[:, 1]) for s in segments) == [(6.0, 8.0), (15.0, 30.0)]
    plt.close(fig)

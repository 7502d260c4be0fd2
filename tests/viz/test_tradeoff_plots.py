"""The trade-off figure: DyDiT medians with seed ranges and interval bands, reference lines with
interval bars, control points, labels kept apart."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dydit_lab.analysis.tradeoff import seed_summary  # noqa: E402
from dydit_lab.viz.labels import overlapping_labels  # noqa: E402
from dydit_lab.viz.tradeoff_plots import BAND, plot_loss_ratios, plot_recipe_curves, plot_tradeoff  # noqa: E402


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


def _interval_segments(ax, wide: bool):
    """(lo, hi) of the 95 % interval bars on ``ax``: the light bands (``wide``) or the thin bars."""
    return sorted((float(s[0, 1]), float(s[1, 1])) for c in ax.collections if c.get_gid() == "interval"
                  and (c.get_linewidth()[0] >= BAND["lw"]) == wide for s in c.get_segments())


def test_plot_tradeoff_draws_intervals_of_single_runs_and_median_runs_and_keeps_labels_apart():
    # λ 0.7 and 0.8 sit close (their labels used to collide), λ 0.4 and 0.6 on the reference line.
    lams, fds = (0.4, 0.5, 0.6, 0.7, 0.8), (16.0, 13.0, 10.5, 10.2, 8.8)
    runs = pd.DataFrame([{"target_ratio": lam, "train_seed": s, "fd_lenet": fd + s, "fd_lenet_lo": fd + s - 1,
                          "fd_lenet_hi": fd + s + 1.5, "accuracy": 0.91 + lam / 20 + s / 1000,
                          "accuracy_lo": 0.9 + lam / 20, "accuracy_hi": 0.92 + lam / 20,
                          "gflops_per_image": 5.5 * lam + s / 100, "block_flops_fraction": lam}
                         for lam, fd in zip(lams, fds) for s in ((0, 1, 2) if lam != 0.5 else (0, 1))])
    static = pd.DataFrame({"gflops_per_image": [1.1, 2.2, 3.3, 5.5], "fd_lenet": [16.1, 10.2, 9.9, 6.2],
                           "fd_lenet_lo": [15.0, 9.5, 9.0, 5.9], "fd_lenet_hi": [17.5, 11.0, 10.8, 6.6],
                           "accuracy": [0.96, 0.953, 0.947, 0.943]})
    summary = seed_summary(runs)
    control = seed_summary(runs[(runs.target_ratio == 0.4) & (runs.train_seed == 0)].assign(target_ratio=1.0))
    fig = plot_tradeoff(summary, references={"parent, 10/20/30/50 steps": static},
                        controls={"no routers, lambda = 1": control})
    fd_axes, acc_axes = fig.axes
    assert _interval_segments(fd_axes, wide=False) == sorted([(15.0, 17.5), (9.5, 11.0), (9.0, 10.8), (5.9, 6.6)])
    assert _interval_segments(acc_axes, wide=False) == []  # the reference rows carry no accuracy interval
    # Bands: each odd-count median's run (seed 1: fd + 1), none for λ = 0.5's two runs, the control's one run.
    medians = [(fd + 1 - 1, fd + 1 + 1.5) for lam, fd in zip(lams, fds) if lam != 0.5]
    bands = _interval_segments(fd_axes, wide=True)
    expected = sorted(medians + [(15.0, 17.5)])
    assert len(bands) == len(expected) and np.allclose(bands, expected)
    for ax in fig.axes:
        assert overlapping_labels(ax) == []
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "no routers, λ = 1" in legend and any("median run's 95 %" in t for t in legend)
    assert "λ" in fig.get_suptitle() and "95 % bootstrap" in fig.get_suptitle()
    assert not any("lambda" in t for t in legend + [t.get_text() for ax in fig.axes for t in ax.texts])


def test_plot_recipe_curves_bands_a_single_seed_recipe_with_its_run_interval():
    runs = pd.DataFrame({"coarse_steps": [0, 24], "fd_lenet": [6.0, 15.0], "fd_lenet_lo": [5.5, 13.0],
                         "fd_lenet_hi": [6.8, 17.0], "accuracy": [0.94, 0.9], "gflops_per_image": [5.5, 3.5]})
    fig = plot_recipe_curves({"rank 8": seed_summary(runs, by="coarse_steps")})
    assert _interval_segments(fig.axes[0], wide=True) == [(5.5, 6.8), (13.0, 17.0)]
    assert _interval_segments(fig.axes[1], wide=True) == []

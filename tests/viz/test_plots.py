"""Figures: return values, axes count and labels, interval bars, label placement, saving."""

from types import SimpleNamespace

import numpy as np
import pandas as pd

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dydit_lab import create_model  # noqa: E402
from dydit_lab.analysis.loss_maps import patch_loss_maps  # noqa: E402
from dydit_lab.evaluation.strategies import series_name  # noqa: E402
from dydit_lab.viz import figures  # noqa: E402
from dydit_lab.viz.labels import LINE, _crossings, _segments, label_boxes, overlapping_labels, place_labels  # noqa: E402
from dydit_lab.viz.plots import (  # noqa: E402
    plot_loss_maps,
    plot_quality_vs_flops,
    plot_sample_grid,
    plot_speedup_vs_batch,
    plot_strategies,
    save_figure,
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("DiT-lab-T")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.eval()
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([1, 2, 3])
    return model, images, labels


def test_plot_loss_maps_grid(setup):
    model, images, labels = setup
    res = patch_loss_maps(model, images, labels, [100, 900])
    fig = plot_loss_maps(res, images, labels)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * (1 + 2 * 2) + 1  # panels + colourbar
    titles = [ax.get_title() for ax in fig.axes]
    assert any("t = 100" in s for s in titles) and any("t = 900" in s for s in titles)
    assert fig.axes[0].get_ylabel() == "label 1"
    assert fig.axes[-1].get_ylabel()  # colourbar label
    fig2 = plot_loss_maps(res, images, normalize=False, outline=False)
    assert len(fig2.axes) == 16


def test_plot_sample_grid(setup):
    _, images, labels = setup
    fig = plot_sample_grid(images, labels, nrow=2, title="samples")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["1", "2", "3"]
    fig2, ax = plt.subplots()
    assert plot_sample_grid(images, ax=ax) is fig2


def test_save_figure_writes_png(setup, tmp_path):
    _, images, _ = setup
    fig = plot_sample_grid(images)
    path = save_figure(fig, tmp_path / "sub" / "grid.png")
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def test_plot_strategies_draws_each_caching_policy_as_its_own_line():
    rows = [("static", "10 steps", None, 1.0, 40.0), ("static", "50 steps", None, 5.0, 20.0),
            ("caching", "FORA N = 2", "fora:2", 2.8, 25.0), ("caching", "FORA N = 3", "fora:3", 2.0, 30.0),
            ("caching", "ToCa 30% every 2", "toca:0.3,interval=2", 3.5, 22.0),
            ("DyDiT + caching", "lambda = 0.5 + FORA N = 2", "fora:2", 1.5, 26.0)]
    table = pd.DataFrame(rows, columns=["strategy", "setting", "cache", "gflops_per_image", "fd_lenet"])
    table["series"] = [series_name(f, c) for f, c in zip(table["strategy"], table["cache"])]
    table["seconds_per_image"] = table["gflops_per_image"] / 10
    table["accuracy"] = 1 - table["fd_lenet"] / 100
    fig = plot_strategies(table)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"static", "caching: FORA", "caching: ToCa", "DyDiT + caching: FORA", "Pareto front"}
    assert list(lines["caching: FORA"].get_xdata()) == [2.0, 2.8]
    # The front over all points: FORA N = 3 (2.0 GFLOPs, FD 30) is beaten by DyDiT + FORA (1.5, 26).
    assert list(lines["Pareto front"].get_xdata()) == [1.0, 1.5, 2.8, 3.5, 5.0]
    # FD panels name every point; accuracy panels only the front and DyDiT's (no crowding).
    texts = lambda ax: sorted(t.get_text() for t in ax.texts)  # noqa: E731
    assert len(texts(fig.axes[0])) == len(table)
    assert texts(fig.axes[2]) == sorted(["10 steps", "λ = 0.5 + FORA N = 2", "FORA N = 2", "ToCa 30% every 2",
                                         "50 steps"])


def test_speedup_vs_batch_keeps_cpu_thread_counts_apart_and_names_no_threads_on_a_gpu():
    row = dict(target_ratio=0.5, speedup=1.8, masked_speedup=1.0)
    bench = pd.DataFrame([{**row, "device": "cpu", "batch_size": 2, "num_threads": 1},
                          {**row, "device": "cpu", "batch_size": 2, "num_threads": 2},
                          {**row, "device": "cuda", "batch_size": 8, "num_threads": 16}])
    fig = plot_speedup_vs_batch(bench)
    labels = [line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")]
    assert "sliced, ratio 0.5, cpu, 1 thread" in labels and "sliced, ratio 0.5, cpu, 2 threads" in labels
    assert "sliced, ratio 0.5, cuda" in labels
    assert not [c for c in fig.axes[0].collections if c.get_gid() == "run_range"]  # no runs recorded: no bars
    assert "bars" not in fig.axes[0].get_title()


def test_speedup_vs_batch_spans_each_batchs_separate_runs():
    row = dict(target_ratio=0.5, masked_speedup=1.0, device="cpu", num_threads=2)
    bench = pd.DataFrame([{**row, "batch_size": 1, "speedup": 1.7, "speedup_runs": (1.5, 1.7, 1.85)},
                          {**row, "batch_size": 4, "speedup": 1.9, "speedup_runs": (1.9, 2.05, 1.8)},
                          {**row, "batch_size": 8, "speedup": 1.95, "speedup_runs": None}])
    fig = plot_speedup_vs_batch(bench)
    (bars,) = [c for c in fig.axes[0].collections if c.get_gid() == "run_range"]
    spans = sorted((float(s[0, 0]), float(s[0, 1]), float(s[1, 1])) for s in bars.get_segments())
    assert spans == [(1.0, 1.5, 1.85), (4.0, 1.8, 2.05)]  # batch 8 has one reading: no bar
    assert "lowest to highest of the runs" in fig.axes[0].get_title()


def _interval_segments(ax):
    """(lo, hi) of every 95 % interval bar on ``ax``, sorted."""
    return sorted((float(s[0, 1]), float(s[1, 1])) for c in ax.collections if c.get_gid() == "interval"
                  for s in c.get_segments())


def crowded_strategies():
    """Rows as `compare` writes them where labels used to collide (the L2C and DyDiT points)."""
    rows = [("static", "10 steps", None, 1.1, 16.0, 0.96), ("static", "20 steps", None, 2.2, 8.3, 0.953),
            ("static", "50 steps", None, 5.5, 6.2, 0.943),
            ("caching", "L2C 0.9", "l2c:0.9", 3.45, 9.8, 0.944), ("caching", "L2C 0.5", "l2c:0.5", 3.9, 9.1, 0.943),
            ("caching", "L2C 0.1", "l2c:0.1", 4.15, 8.9, 0.944),
            ("DyDiT", "lambda = 0.5", None, 3.0, 13.9, 0.921), ("DyDiT", "lambda = 0.7", None, 3.95, 10.3, 0.944),
            ("DyDiT + fewer steps", "lambda = 0.5, 20 steps", None, 1.2, 17.9, 0.935),
            ("DyDiT + caching", "lambda = 0.5 + ToCa 30% every 3", "toca:0.3,interval=3", 1.3, 16.2, 0.934),
            ("DyDiT + caching", "lambda = 0.5 + FORA N = 2", "fora:2", 1.45, 19.0, 0.922)]
    table = pd.DataFrame(rows, columns=["strategy", "setting", "cache", "gflops_per_image", "fd_lenet", "accuracy"])
    table["series"] = [series_name(f, c) for f, c in zip(table["strategy"], table["cache"])]
    table["seconds_per_image"] = table["gflops_per_image"] / 50
    table["fd_lenet_lo"], table["fd_lenet_hi"] = table["fd_lenet"] * 0.9, table["fd_lenet"] * 1.12
    table["accuracy_lo"], table["accuracy_hi"] = table["accuracy"] - 0.004, table["accuracy"] + 0.003
    table.loc[0, ["fd_lenet_lo", "fd_lenet_hi", "accuracy_lo", "accuracy_hi"]] = float("nan")  # a row without
    return table


def test_plot_strategies_draws_each_rows_interval_and_keeps_labels_apart():
    table = crowded_strategies()
    fig = plot_strategies(table)
    with_interval = table.dropna(subset=["fd_lenet_lo"])
    for ax, metric in zip(fig.axes, ("fd_lenet", "fd_lenet", "accuracy", "accuracy")):
        expected = sorted(zip(with_interval[f"{metric}_lo"], with_interval[f"{metric}_hi"]))
        assert np.allclose(_interval_segments(ax), expected) and len(_interval_segments(ax)) == len(expected)
        assert overlapping_labels(ax) == []
        assert not any("lambda" in t.get_text() for t in ax.texts)
    assert "λ = 0.5, 20 steps" in [t.get_text() for t in fig.axes[2].texts]  # DyDiT families labelled
    assert any("95 % bootstrap interval" in t.get_text() for t in fig.legends[0].get_texts())
    # Labels avoid the lines: none crosses a series or the Pareto front here, where there is room.
    segments, weights = _segments(fig.axes[0], fig.dpi / 72)
    boxes = np.array([b.extents for b in label_boxes(fig.axes[0])])
    assert _crossings(boxes, segments[weights == LINE]).sum() == 0


def test_plot_quality_vs_flops_draws_intervals_and_separates_labels_at_one_point():
    table = pd.DataFrame({"name": ["DiT-lab-S", "DyDiT-lab-L-0.5", "DiT-lab-L", "FlexiDiT-lab-L-adapters"],
                          "gflops_per_step": [0.015, 0.057, 0.111, 0.111], "fd_lenet": [16.1, 13.9, 6.2, 6.2],
                          "fd_lenet_lo": [15.0, 13.0, 5.8, None], "fd_lenet_hi": [17.0, 15.0, 6.7, None],
                          "accuracy": [0.903, 0.921, 0.943, 0.943]})
    fig = plot_quality_vs_flops(table)
    assert _interval_segments(fig.axes[0]) == [(5.8, 6.7), (13.0, 15.0), (15.0, 17.0)]
    assert _interval_segments(fig.axes[1]) == []  # no accuracy intervals in the rows: no bars
    assert "95 % bootstrap intervals" in fig.get_suptitle()
    for ax in fig.axes:
        assert len(ax.texts) == 4 and overlapping_labels(ax) == []


def test_place_labels_keeps_labels_off_a_line_through_their_points():
    fig, ax = plt.subplots(figsize=(4, 3))
    x = np.arange(8.0)
    ax.plot(x, np.ones(8), "o-")
    place_labels(ax, list(zip(x, np.ones(8))), [f"point {i}" for i in range(8)])
    segments, _ = _segments(ax, fig.dpi / 72)
    boxes = np.array([b.extents for b in label_boxes(ax)])
    assert len(boxes) == 8 and overlapping_labels(ax) == []
    assert _crossings(boxes, segments).sum() == 0
    assert place_labels(ax, [(float("nan"), 1.0)], ["nowhere"]) == []  # no finite point, no label


def test_strategy_samples_titles_print_lambda_as_a_letter(monkeypatch):
    strategy = SimpleNamespace(name="DyDiT: lambda = 0.5", steps=2, model=lambda *_: None)
    monkeypatch.setattr(figures, "select", lambda names: [strategy, strategy])
    monkeypatch.setattr(figures, "generate",
                        lambda model, num, **_: (torch.zeros(num, 1, 8, 8), torch.arange(num) % 10))
    fig = figures.strategy_samples_figure(num=10)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["DyDiT: λ = 0.5"] * 2
    assert not any("lambda" in str(v) for v in figures.PAPER_V100["label"])

"""Figures: return values, axes count and labels, saving."""

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
from dydit_lab.viz.plots import (  # noqa: E402
    plot_loss_maps,
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

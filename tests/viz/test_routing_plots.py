"""Plots of routing traces: width heatmaps, token maps, FLOPs per step, the dashboard, learned
width schedules and a measured speed-up."""

import dataclasses

import matplotlib
import pytest
import torch

from dydit_lab.analysis.routing import width_schedule
from dydit_lab.viz.plots import save_figure
from dydit_lab.viz.routing_plots import (plot_flops_per_step, plot_measured_speedup, plot_router_dashboard,
                                         plot_token_keep, plot_token_map, plot_width_curves, plot_width_heatmap,
                                         plot_width_schedules)
from tests.helpers import random_dydit





def test_router_plots(traces, tmp_path):
    trace = traces["model 0"]
    fig = plot_width_heatmap(trace, "groups", step=2)
    assert fig.axes[0].get_xlabel().startswith("timestep")
    with pytest.raises(ValueError):
        plot_width_heatmap(trace, "tokens")
    fig = plot_token_map(trace, step=1, sample=2, layer=1)
    assert "t = 749" in fig.axes[0].get_title()
    fig = plot_flops_per_step(list(traces.values()))
    assert len(fig.axes[0].get_lines()) >= 2
    path = save_figure(plot_router_dashboard(trace, step=3, layer=1, sample=0), tmp_path / "d.png")
    assert path.stat().st_size > 10_000




def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


def test_token_keep_and_width_curves(traces):
    fig = plot_token_keep(traces["model 0"], highlight_layer=1)
    assert fig.axes and fig.axes[0].get_xlabel()
    fig = plot_width_curves(list(traces.values()))
    assert fig.axes and len(fig.axes[0].get_lines()) >= 2


def _images(trace, samples):
    """``trace`` with other final samples (e.g. VAE-decoded RGB images or raw latents)."""
    return dataclasses.replace(trace, samples=samples)


def test_token_map_lies_over_decoded_images_at_their_scale(traces):
    trace = traces["model 0"]  # 4x4 tokens
    rgb = _images(trace, torch.zeros(3, 3, 64, 64))  # as decoded: 16 pixels per token
    ax = plot_token_map(rgb, step=1, sample=2, layer=1).axes[0]
    image, overlay = ax.get_images()
    assert image.get_array().shape == (64, 64, 3) and overlay.get_array().shape == (64, 64, 4)
    keep = trace.token_grid(1, 2, 1).numpy()
    assert (overlay.get_array()[::16, ::16, 3] > 0).tolist() == (keep == 0).tolist()
    assert "decoded image, class 3" in ax.get_title()
    latents = plot_token_map(_images(trace, torch.zeros(3, 4, 8, 8)), step=1, sample=2, layer=1).axes[0]
    assert len(latents.get_images()) == 1 and latents.get_images()[0].get_array().shape == (4, 4)
    assert "no VAE" in latents.get_title()


def test_keep_rates_of_a_deep_model_get_a_colour_bar(traces):
    trace = traces["model 0"]
    deep = dataclasses.replace(trace, tokens=trace.tokens.repeat(1, 1, 8, 1))  # 16 blocks
    fig = plot_token_keep(deep)
    assert fig.axes[0].get_legend() is None and len(fig.axes) == 2  # the plot and its colour bar
    assert plot_token_keep(trace).axes[0].get_legend() is not None


def test_width_schedules_figure():
    schedules = {name: width_schedule(random_dydit(seed), name=name) for seed, name in enumerate(("a", "b"))}
    fig = plot_width_schedules(schedules)
    titles = [ax.get_title() for ax in fig.axes]
    assert "a: active attention heads" in titles and "b: active MLP channel groups" in titles


def test_measured_speedup_bars():
    record = {"name": "DyDiT-XL", "device": "cuda:0", "device_name": "GPU", "batch_size": 8, "flops_ratio": 0.5,
              "static_seconds": 2.0, "dynamic_seconds": 1.25, "masked_seconds": 2.5, "speedup": 1.6,
              "masked_speedup": 0.8}
    ax = plot_measured_speedup(record).axes[0]
    assert [round(p.get_height(), 2) for p in ax.patches] == [2.0, 1.25, 2.5]
    assert [t.get_text() for t in ax.texts] == ["1.00x", "1.60x", "0.80x"]
    assert ax.get_lines()[0].get_ydata()[0] == 1.0  # the ideal: static x FLOPs fraction

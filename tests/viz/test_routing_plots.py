"""Plots of routing traces: width heatmaps, token maps, FLOPs per step, the dashboard."""

import matplotlib
import pytest

from dydit_lab.viz.plots import save_figure
from dydit_lab.viz.routing_plots import (plot_flops_per_step, plot_router_dashboard, plot_token_keep,
                                         plot_token_map, plot_width_curves, plot_width_heatmap)





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

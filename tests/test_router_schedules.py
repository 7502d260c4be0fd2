"""Routing traces of sampling runs, their plots and the ipywidgets explorer."""

import matplotlib
import pytest
import torch

import dydit_lab
from dydit_lab.analysis import trace_sampling
from dydit_lab.dydit import DyDiT
from dydit_lab.plotting import (plot_flops_per_step, plot_router_dashboard, plot_token_map,
                                plot_width_heatmap, save_figure)
from dydit_lab.widgets import RouterExplorer


def _dydit(seed=0):
    torch.manual_seed(seed)
    model = DyDiT(dydit_lab.models.get_config("DiT-lab-T"))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    for block in model.blocks:
        for r in (block.attn_rate.router, block.mlp_rate.router):
            r.weight.data.normal_(0, 2.0)
            r.bias.data.zero_()
        block.token_selection.mlp_head[2].bias.data.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def traces():
    return {f"model {s}": trace_sampling(_dydit(s), [1, 7, 3], steps=5, progress=False, name=f"model {s}")
            for s in (0, 1)}


def test_trace_shapes_and_consistency(traces):
    trace = traces["model 0"]
    assert trace.timesteps == [999, 749, 500, 250, 0]
    assert trace.heads.shape == (5, 3, 2, 4) and trace.tokens.shape == (5, 3, 2, 16)
    assert trace.x_t.shape == (5, 3, 1, 32, 32) and trace.samples.shape == (3, 1, 32, 32)
    # TDW depends on t only: every sample at a step has the same width.
    assert (trace.heads == trace.heads[:, :1]).all()
    assert 0 < trace.mean_flops_fraction < 1
    assert trace.token_grid(0, 0, 0).shape == (4, 4)


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


def test_explorer_callbacks_update_the_plots(traces):
    explorer = RouterExplorer(traces)
    first_title, first_png = explorer.title, _png(explorer.figure)
    explorer.step.value = 3  # as if the slider were moved
    assert "t = 250" in explorer.title and explorer.t_label.value == "t = 250"
    assert _png(explorer.figure) != first_png
    explorer.layer.value = 1
    assert "block 1" in explorer.title
    explorer.checkpoint.value = "model 1"
    assert explorer.title.startswith("model 1") and explorer.title != first_title
    explorer.sample.value = 2
    assert "digit 3" in explorer.figure.axes[2].get_title()
    with pytest.raises(ValueError):
        RouterExplorer({})


def _png(fig):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"

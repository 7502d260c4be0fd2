"""Token keep maps over the final samples and keep rates on strokes vs background."""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from dydit_lab.analysis.token_maps import keep_maps, token_stroke_share
from dydit_lab.viz.figures import BUILDERS
from dydit_lab.viz.plots import T_LABEL
from dydit_lab.viz.token_map_plots import (plot_stroke_keep, plot_token_map_grid, plot_token_map_grids,
                                           token_maps_figure)


def test_grid_has_a_row_per_sample_and_a_column_per_step(traces):
    trace = traces["model 0"]  # 5 steps, labels 1, 7, 3, 4x4 tokens of 8x8 pixels
    fig = plot_token_map_grid(trace, samples=[0, 2], steps=3)
    panels, (cbar,) = fig.axes[:-1], fig.axes[-1:]
    assert len(panels) == 6 and cbar.get_ylabel() == "share of blocks that keep the token"
    assert [ax.get_title() for ax in panels[:3]] == ["t = 999", "t = 500", "t = 0"]
    assert panels[0].get_ylabel() == "digit 1" and panels[3].get_ylabel() == "digit 3"
    image, overlay = panels[4].get_images()  # sample 2 at step 2 (the middle column)
    assert image.get_array().shape == (32, 32) and overlay.get_alpha() == pytest.approx(0.5)
    assert np.allclose(overlay.get_array(), keep_maps(trace)[2, 2].numpy())
    assert tuple(overlay.get_extent()) == (-0.5, 31.5, 31.5, -0.5)  # each token on its own cell of pixels


def test_grid_of_one_block_over_decoded_images(traces):
    trace = dataclasses.replace(traces["model 1"], samples=torch.zeros(3, 3, 64, 64))  # as a VAE decodes
    fig = plot_token_map_grid(trace, samples=[1], steps=[4, 0], layer=1)
    first, second, cbar = fig.axes
    assert cbar.get_ylabel() == "block 1 keeps the token" and "block 1" in fig.get_suptitle()
    assert first.get_title() == "t = 0" and first.get_ylabel() == "class 7"
    assert first.get_images()[0].get_array().shape == (64, 64, 3)
    assert set(np.unique(second.get_images()[1].get_array())) <= {0.0, 1.0}


def test_grid_defaults_and_bad_input(traces):
    trace = dataclasses.replace(traces["model 0"], name="lambda = 0.5")
    fig = plot_token_map_grid(trace)  # four samples (here all three), eight steps (here all five)
    assert len(fig.axes) == 3 * 5 + 1 and fig.get_suptitle().startswith("λ = 0.5")
    with pytest.raises(ValueError, match="at least one"):
        plot_token_map_grid(trace, samples=[])
    with pytest.raises(ValueError, match="layer"):
        plot_token_map_grid(trace, layer=9)


def test_grids_of_several_traces_in_one_figure(traces):
    fig = plot_token_map_grids(traces, samples=[1], steps=[0, 4])
    assert [part.get_suptitle().split(":")[0] for part in fig.subfigs] == ["model 0", "model 1"]
    assert len(fig.axes) == 6 and all(len(part.axes) == 2 + 1 for part in fig.subfigs)
    width, height = fig.get_size_inches()
    assert width == pytest.approx(1.3 * 2 + 1.6) and height == pytest.approx(2 * (1.3 + 0.9))
    one = plot_token_map_grids({"only": traces["model 0"]})  # one trace: one panel, not an error
    assert len(one.subfigs) == 1 and len(one.subfigs[0].axes) == 3 * 5 + 1


def test_stroke_keep_lines(traces):
    shares = {f"lambda = {i}": token_stroke_share(t) for i, t in enumerate(traces.values())}
    ax = plot_stroke_keep(shares).axes[0]
    lines = ax.get_lines()
    assert len(lines) == 6 and ax.get_xlabel() == T_LABEL
    assert np.allclose(lines[0].get_xdata(), [999, 749, 500, 250, 0])
    assert np.allclose(lines[1].get_ydata(), shares["lambda = 0"]["keep_background"], equal_nan=True)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["λ = 0: strokes", "λ = 0: background", "λ = 0: strokes, by position alone"]
    one = dataclasses.replace(traces["model 0"], samples=traces["model 0"].samples[:1],
                              tokens=traces["model 0"].tokens[:, :1])
    ax = plot_stroke_keep({"one": token_stroke_share(one)}).axes[0]
    assert len(ax.get_lines()) == 2  # one sample: no other samples to give a positional baseline


def test_token_maps_figure_from_given_traces(traces):
    assert "token_maps" in BUILDERS
    fig, table = token_maps_figure(traces, samples=[0, 1], steps=3)
    grids, chart = fig.subfigs
    assert len(grids.subfigs) == 2 and len(grids.subfigs[0].axes) == 2 * 3 + 1
    assert chart.axes[0].get_xlabel() == T_LABEL
    assert set(table["model"]) == set(traces) and {"keep_stroke", "keep_background"} <= set(table.columns)
    plt.close(fig)

"""Where a DyDiT's token router (SDT) keeps tokens over a sampling run: keep maps over the
final samples at several steps, and the keep rate on strokes vs background per step
(:mod:`dydit_lab.analysis.token_maps`). Headless-safe, like :mod:`.plots`."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure

from ..analysis.routing import RoutingTrace
from ..analysis.token_maps import keep_maps, spaced_steps, spread, stroke_share_summary, token_stroke_share
from .plots import LABEL_SIZE, PALETTE, T_LABEL, TICK_SIZE, TITLE_SIZE, _axes, _image_array, _style, display_name

KEEP_CMAP = "viridis"  # perceptually uniform; its dark end lets a white stroke show through
KEEP_ALPHA = 0.5


def plot_token_map_grid(trace: RoutingTrace, samples: Sequence[int] | None = None, steps: int | Sequence[int] = 8,
                        layer: int | None = None, fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """Rows: ``samples`` (indices into the trace; default four spread over it); columns: ``steps``
    (a count of evenly spaced sampling steps, noisy first, or step indices). Each panel is the
    sample's final image in grey under that step's keep map: the share of blocks that keep
    each token (``layer=None``) or whether block ``layer`` keeps it."""
    maps = keep_maps(trace, layer).numpy()  # checks the trace and the layer
    samples = spread(maps.shape[1], 4) if samples is None else list(samples)
    steps = spaced_steps(trace, steps) if isinstance(steps, int) else list(steps)
    if not samples or not steps:
        raise ValueError("need at least one sample and one step to show")
    H, W = trace.samples.shape[-2:]
    if fig is None:
        fig = plt.figure(figsize=_grid_size(trace, samples, steps), layout="constrained")
    grid = fig.subplots(len(samples), len(steps), squeeze=False)
    for row, sample in zip(grid, samples):
        image = _image_array(trace.samples[sample])
        for ax, step in zip(row, steps):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            # extent in pixels, so each token's value covers its own cell of the image
            shown = ax.imshow(maps[step, sample], cmap=KEEP_CMAP, vmin=0, vmax=1, alpha=KEEP_ALPHA,
                              interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
            ax.set_xticks([]), ax.set_yticks([])
        kind = "digit" if trace.samples.shape[1] == 1 else "class"
        row[0].set_ylabel(f"{kind} {int(trace.labels[sample])}", fontsize=LABEL_SIZE)
    for ax, step in zip(grid[0], steps):
        ax.set_title(f"t = {trace.timesteps[step]}", fontsize=TICK_SIZE + 1)
    cbar = fig.colorbar(shown, ax=grid.ravel().tolist(), shrink=0.85)
    cbar.ax.set_facecolor("black")  # the bar blends as the overlay does on the black background
    cbar.set_label("share of blocks that keep the token" if layer is None else f"block {layer} keeps the token",
                   fontsize=TICK_SIZE + 1)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    blocks = "mean over blocks" if layer is None else f"block {layer}"
    fig.suptitle(f"{display_name(trace.name)}: tokens SDT keeps ({blocks}), over the final sample",
                 fontsize=TITLE_SIZE)
    return fig


def plot_stroke_keep(shares: Mapping[str, pd.DataFrame], ax: Axes | None = None, by_position: bool = True) -> Figure:
    """Keep rate on stroke tokens (solid) and on background tokens (dashed) vs t, per model
    (``shares``: name -> :func:`~dydit_lab.analysis.token_maps.token_stroke_share`); dotted,
    with ``by_position``, the stroke keep rate the token positions alone would give."""
    fig, ax = _axes(ax, figsize=(6.5, 4))
    for i, (name, share) in enumerate(shares.items()):
        color, label = PALETTE[i % len(PALETTE)], display_name(name)
        ax.plot(share["t"], share["keep_stroke"], color=color, lw=2, label=f"{label}: strokes")
        ax.plot(share["t"], share["keep_background"], color=color, lw=2, ls="--", label=f"{label}: background")
        if by_position and share["keep_stroke_by_position"].notna().any():
            ax.plot(share["t"], share["keep_stroke_by_position"], color=color, lw=1.2, ls=":",
                    label=f"{label}: strokes, by position alone")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(T_LABEL, fontsize=LABEL_SIZE)
    ax.set_ylabel("tokens kept (share)", fontsize=LABEL_SIZE)
    ax.set_title("SDT keep rate: stroke vs background tokens", fontsize=TITLE_SIZE)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _style(ax)
    return fig


def _grid_size(trace: RoutingTrace, samples, steps) -> tuple[float, float]:
    """(width, height) in inches of :func:`plot_token_map_grid`'s panels for ``trace``."""
    rows = len(samples) if samples is not None else len(spread(len(trace.labels), 4))
    cols = min(steps, len(trace.timesteps)) if isinstance(steps, int) else len(steps)
    return 1.3 * cols + 1.6, 1.3 * rows + 0.9


def plot_token_map_grids(traces: Mapping[str, RoutingTrace], samples: Sequence[int] | None = None,
                         steps: int | Sequence[int] = 8, layer: int | None = None,
                         fig: Figure | SubFigure | None = None) -> Figure | SubFigure:
    """:func:`plot_token_map_grid` of every trace in one figure, one panel of rows per trace."""
    sizes = [_grid_size(trace, samples, steps) for trace in traces.values()]
    if fig is None:
        fig = plt.figure(figsize=(max(w for w, _ in sizes), sum(h for _, h in sizes)), layout="constrained")
    parts = fig.subfigures(len(traces), 1, squeeze=False, height_ratios=[h for _, h in sizes]).ravel()
    for part, trace in zip(parts, traces.values()):
        plot_token_map_grid(trace, samples, steps, layer, fig=part)
    return fig


def token_maps_figure(traces: Mapping[str, RoutingTrace], samples: Sequence[int] | None = None,
                      steps: int | Sequence[int] = 8) -> tuple[Figure, pd.DataFrame]:
    """Keep maps over the final samples of every trace (:func:`plot_token_map_grids`) above the
    keep rates on strokes vs background (:func:`plot_stroke_keep`); the table is
    :func:`~dydit_lab.analysis.token_maps.stroke_share_summary` (quarters of t)."""
    sizes = [_grid_size(trace, samples, steps) for trace in traces.values()]
    grids = sum(h for _, h in sizes)
    fig = plt.figure(figsize=(max(w for w, _ in sizes), grids + 4.0), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[grids, 4.0])
    plot_token_map_grids(traces, samples, steps, fig=top)
    shares = {name: token_stroke_share(trace) for name, trace in traces.items()}
    plot_stroke_keep(shares, ax=bottom.subplots())
    return fig, stroke_share_summary(shares)

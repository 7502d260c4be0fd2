"""Loss-gap figures (DyDiT Figure 1(a)): the loss of a small and a large DiT per timestep and
their gap, with the evaluation-noise interval and, over several training runs per size, the
between-seed range.

Headless-safe like :mod:`.plots`: every function returns its Figure.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from ..analysis.loss_gap import seed_gap
from .plots import LABEL_SIZE, PALETTE, T_LABEL, TICK_SIZE, TITLE_SIZE, _style

__all__ = ["plot_loss_curves", "plot_gap_panels"]

ABSOLUTE_LABEL = "loss gap (small − large)"
RELATIVE_LABEL = "relative gap (small − large) / large"
NO_SEED_BAND = "one run per size: no between-seed band"


def _plain_log_ticks(ax: Axes, values: np.ndarray) -> None:
    """Plain numbers on a log axis; label minor ticks too when less than a decade is shown."""
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    finite = values[np.isfinite(values) & (values > 0)]
    narrow = finite.size and finite.max() / finite.min() < 10
    # Within one decade there may be no major tick at all, so the minor ones carry the scale.
    ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())


def _gap_from(data: pd.DataFrame, small, large, smooth: int, confidence: float):
    """(gap DataFrame, small name, large name) from a long loss df or an already computed gap df."""
    if "gap" in data.columns:
        return (data, small or data.attrs.get("small", "small"),
                large or data.attrs.get("large", "large"))
    if small is None or large is None:
        models = list(pd.unique(data["model"]))
        if len(models) != 2:
            raise ValueError(f"{len(models)} models: name the pair with small= and large=")
        small, large = models  # documented: first model is the small one
    return seed_gap(data, small, large, smooth=smooth, confidence=confidence), small, large


def _draw_losses(ax: Axes, gap: pd.DataFrame, small: str, large: str) -> None:
    """Both models' loss per timestep on a log axis (run-averaged when there are several runs)."""
    runs = gap.attrs.get("runs", {})
    t = gap["t"].to_numpy()
    for name, column, colour in ((small, "small", PALETTE[0]), (large, "large", PALETTE[1])):
        k = runs.get(name, 1)
        ax.plot(t, gap[column], color=colour, lw=1.5,
                label=f"{name} (mean of {k} runs)" if k > 1 else name)
    ax.set_yscale("log")
    _plain_log_ticks(ax, gap[["small", "large"]].to_numpy())
    ax.set_ylabel("ε-prediction MSE (per pixel)", fontsize=LABEL_SIZE)
    ax.legend(fontsize=TICK_SIZE, frameon=False, loc="upper right")


def _draw_gap(ax: Axes, gap: pd.DataFrame, small: str, large: str, relative: bool,
              confidence: float, legend: bool = True) -> None:
    """The gap with its evaluation-noise band and the between-seed range, or a legend entry
    saying there is none (one run per size)."""
    t = gap["t"].to_numpy()
    scale = gap["large"].to_numpy() if relative else 1.0
    seed_lo, seed_hi = ("relative_seed_lo", "relative_seed_hi") if relative else ("seed_lo", "seed_hi")
    if seed_lo in gap.columns and gap[seed_lo].notna().any():
        colour = PALETTE[4]
        ax.fill_between(t, gap[seed_lo], gap[seed_hi], color=colour, alpha=0.25, lw=0,
                        label=f"between seeds: min–max of {gap.attrs.get('pairs', '?')} "
                              "small × large pairs of runs")
        for column in (seed_lo, seed_hi):  # edges stay visible where the two bands overlap
            ax.plot(t, gap[column], color=colour, lw=0.8)
    else:
        ax.plot([], [], ls="none", label=NO_SEED_BAND)
    band = gap.attrs.get("confidence", confidence)
    ax.fill_between(t, gap["gap_lo"] / scale, gap["gap_hi"] / scale, color=PALETTE[2], alpha=0.35,
                    lw=0, label=f"{band:.0%} CI, evaluation noise (images and noise drawn)")
    ax.plot(t, gap["gap"] / scale, color=PALETTE[2], lw=1.5, label=f"{small} − {large}")
    ax.axhline(0.0, color="0.3", lw=1, ls="--")
    ax.set_ylabel(RELATIVE_LABEL if relative else ABSOLUTE_LABEL, fontsize=LABEL_SIZE)
    ax.set_xlabel(T_LABEL, fontsize=LABEL_SIZE)
    if legend:
        ax.legend(fontsize=TICK_SIZE, frameon=False)


def _finish(axes: Sequence[Axes], t: np.ndarray) -> None:
    for ax in axes:
        ax.set_xlim(t.min(), t.max())
        ax.grid(alpha=0.3)
        _style(ax)


def _smooth_suffix(gap: pd.DataFrame) -> str:
    window = gap.attrs.get("smooth", 1)
    return f" (rolling mean over {window} timesteps)" if window > 1 else ""


def plot_loss_curves(data: pd.DataFrame, small: str | None = None, large: str | None = None, *,
                     smooth: int = 1, confidence: float = 0.95, relative: bool = False,
                     axes: Sequence[Axes] | None = None, fig: Figure | None = None,
                     title: str | None = None) -> Figure:
    """Per-timestep loss of two models (log scale, top) and their gap with its band (bottom).

    ``data`` is either a long loss table (:func:`~dydit_lab.analysis.loss_gap.per_timestep_loss`
    or :func:`~dydit_lab.analysis.loss_gap.per_run_loss`; with two models, or the pair named by
    ``small``/``large``; with exactly two and no names, the first listed is taken as small) or
    an already computed gap (:func:`~dydit_lab.analysis.loss_gap.seed_gap` or ``loss_gap``; then
    ``smooth``/``confidence`` are its own). ``relative=True`` plots the gap divided by the large
    model's loss (the evaluation band likewise divided, treating that loss as fixed). Draws into
    ``axes`` (two Axes) or ``fig`` if given. :func:`plot_gap_panels` shows both gaps at once.
    """
    gap, small, large = _gap_from(data, small, large, smooth, confidence)
    if axes is None:
        if fig is None:
            fig = plt.figure(figsize=(7.5, 6.5), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
    ax_loss, ax_gap = axes
    _draw_losses(ax_loss, gap, small, large)
    _draw_gap(ax_gap, gap, small, large, relative, confidence)
    _finish((ax_loss, ax_gap), gap["t"].to_numpy())
    ax_loss.set_title(title or f"Noise-prediction loss per timestep{_smooth_suffix(gap)}",
                      fontsize=TITLE_SIZE)
    return ax_loss.figure


def plot_gap_panels(data: pd.DataFrame, small: str | None = None, large: str | None = None, *,
                    smooth: int = 1, confidence: float = 0.95, fig: Figure | None = None,
                    title: str | None = None) -> Figure:
    """Loss per timestep (top, log scale) over two gap panels side by side: the absolute gap
    loss_small − loss_large (bottom left, as DyDiT's Figure 1(a) draws it) and the relative
    gap (small − large) / large (bottom right).

    ``data`` as in :func:`plot_loss_curves`. Each gap panel draws the ``confidence``
    evaluation-noise interval and, with several runs per size, the between-seed range
    (min–max over every small × large pair of runs, see
    :func:`~dydit_lab.analysis.loss_gap.seed_gap`); with one run per size the panels say that
    there is no between-seed band (in the legend below them, shared by both). Axes: loss, absolute
    gap, relative gap (in that order).
    """
    gap, small, large = _gap_from(data, small, large, smooth, confidence)
    if fig is None:
        fig = plt.figure(figsize=(12, 7.5), layout="constrained")
    panels = fig.subplot_mosaic([["loss", "loss"], ["absolute", "relative"]], sharex=True,
                                height_ratios=[1, 1.15])
    _draw_losses(panels["loss"], gap, small, large)
    _draw_gap(panels["absolute"], gap, small, large, False, confidence, legend=False)
    _draw_gap(panels["relative"], gap, small, large, True, confidence, legend=False)
    # One legend for both gap panels, below them, so that it covers no curve.
    fig.legend(*panels["absolute"].get_legend_handles_labels(), loc="outside lower center", ncols=3,
               fontsize=TICK_SIZE, frameon=False)
    panels["absolute"].set_title("absolute gap (as in DyDiT Fig. 1a)", fontsize=LABEL_SIZE)
    panels["relative"].set_title("relative gap (to the large model's loss)", fontsize=LABEL_SIZE)
    _finish(list(panels.values()), gap["t"].to_numpy())
    fig.suptitle(title or f"Noise-prediction loss per timestep{_smooth_suffix(gap)}",
                 fontsize=TITLE_SIZE)
    return fig

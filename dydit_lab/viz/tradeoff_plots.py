"""The paper's quality-vs-FLOPs figure over λ, with training seeds (notebook 06): DyDiT's median
over seeds with its min-max range at each λ, next to reference curves (the parent and lab-S at
fewer sampling steps) and control points (the same extra training without routers, ablations).

Every point also shows a 95 % bootstrap interval over the generated samples where the table
passed in has one (columns ``{metric}_lo``/``_hi``): a thin bar on a single run (the reference
rows), a light wide band behind a median's seed range (the median run's interval, which
:func:`~dydit_lab.analysis.tradeoff.seed_summary` carries where the median is one run)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..analysis.loss_gap import loss_gap
from .gap_plots import _plain_log_ticks
from .labels import place_labels
from .plots import (LABEL_SIZE, PALETTE, TITLE_SIZE, _axes, _style, display_name, drawn_intervals, interval_bars,
                    interval_handle)

PANELS = (("fd_lenet", "FD-LeNet (lower is better)"), ("accuracy", "class accuracy (higher is better)"))
BAND = dict(lw=4, alpha=0.25)  # the median run's 95 % interval behind a median's seed range
DODGE = 4.0  # points between the bands of series that share x values (controls, recipes)
NOTE = "capped bars: min-max over training seeds; thin bars and shading: 95 % bootstrap intervals over the generated samples"


def plot_tradeoff(summary: pd.DataFrame, references: dict[str, pd.DataFrame] | None = None,
                  controls: dict[str, pd.DataFrame] | None = None, label: str = "DyDiT (median of seeds)") -> Figure:
    """FD-LeNet and accuracy vs GFLOPs per image.

    ``summary``: :func:`~dydit_lab.analysis.tradeoff.seed_summary` by ``target_ratio`` (bars: the
    min-max over training seeds; light bands: the median run's 95 % bootstrap interval, where the
    summary has ``{metric}_lo``/``_hi``; each point labelled with its λ and run count, labels
    kept apart by :func:`~dydit_lab.viz.labels.place_labels`). ``references``: name -> rows with
    ``gflops_per_image`` and the metrics, drawn as lines (e.g. the static parent at 10/20/30/50
    steps), with thin 95 % interval bars where the rows carry ``{metric}_lo``/``_hi``.
    ``controls``: name -> a seed summary, drawn as single points with ranges (and bands).
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for ax, (metric, metric_label) in zip(axes, PANELS):
        _references(ax, references, metric, lambda i: PALETTE[(i + 1) % len(PALETTE)], alpha=0.8)
        _ranged(ax, summary, metric, PALETTE[0], "s-", display_name(label))
        for j, (name, rows) in enumerate((controls or {}).items()):  # controls share their compute: bands side by side
            _ranged(ax, rows, metric, PALETTE[(j + 5) % len(PALETTE)], "D", display_name(name),
                    dodge=(j - (len(controls) - 1) / 2) * DODGE)
        _label_compute_axes(ax, metric_label)
    _legend_and_title(fig, f"Quality vs compute over the FLOPs target λ\n({NOTE})")
    names = [f"λ = {lam:g} ({runs})" for lam, runs in zip(summary["target_ratio"], summary["runs"])]
    for ax, (metric, _) in zip(axes, PANELS):  # last: the legend and title settle where the axes sit
        place_labels(ax, list(zip(summary["gflops_per_image_median"], summary[f"{metric}_median"])), names,
                     colours=[PALETTE[0]] * len(names), fontsize=7)
    return fig


def plot_recipe_curves(curves: dict[str, pd.DataFrame], references: dict[str, pd.DataFrame] | None = None,
                       by: str = "coarse_steps", title: str = "FlexiDiT fine-tuning recipes") -> Figure:
    """FD-LeNet (log axis) and accuracy vs GFLOPs per image, one line per recipe.

    ``curves``: label -> :func:`~dydit_lab.analysis.tradeoff.seed_summary` by ``by`` (medians, with
    min-max bars over training seeds and light bands for the median run's 95 % bootstrap interval
    over the generated samples where the summary has one; the legend gives each recipe's run
    count), e.g. from :func:`~dydit_lab.analysis.tradeoff.recipe_curves`. ``references``: as in
    :func:`plot_tradeoff` (thin interval bars where the rows have them).
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for ax, (metric, metric_label) in zip(axes, PANELS):
        _references(ax, references, metric, lambda i: "0.35" if i == 0 else PALETTE[-1 - i], alpha=0.9)
        for j, (label, summary) in enumerate(curves.items()):
            summary = summary.sort_values("gflops_per_image_median")
            low, high = int(summary["runs"].min()), int(summary["runs"].max())
            seeds = f"{low}-{high} seeds" if low != high else "1 seed" if low == 1 else f"{low} seeds"
            _ranged(ax, summary, metric, PALETTE[j % len(PALETTE)], "s-", f"{display_name(label)} ({seeds})",
                    dodge=(j - (len(curves) - 1) / 2) * DODGE)  # recipes share the k columns: bands side by side
        first = next(iter(curves.values()))
        for k, x in zip(first[by], first["gflops_per_image_median"]):  # which k each column of points is
            ax.annotate(f"k = {k:g}", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=7, color="0.3")
        if metric == "fd_lenet":
            ax.set_yscale("log")
            values = [c[f"{metric}_{stat}"] for c in curves.values() for stat in ("min", "max")]
            values += [r[metric] for r in (references or {}).values()]
            _plain_log_ticks(ax, np.concatenate([np.asarray(v, float) for v in values]))
        _label_compute_axes(ax, metric_label)
    _legend_and_title(fig, f"{title}\n({NOTE})")
    return fig


def _references(ax, references: dict[str, pd.DataFrame] | None, metric: str, colour_of, alpha: float) -> None:
    """Reference rows as dashed lines by compute, each point with its thin 95 % interval bar."""
    for i, (name, rows) in enumerate((references or {}).items()):
        rows = rows.sort_values("gflops_per_image")
        ax.plot(rows["gflops_per_image"], rows[metric], "o--", color=colour_of(i), alpha=alpha,
                label=display_name(name))
        interval_bars(ax, rows["gflops_per_image"], rows, metric, colour_of(i))


def _label_compute_axes(ax, metric_label: str) -> None:
    ax.set_xlabel("GFLOPs per image (whole sampling run)", fontsize=LABEL_SIZE)
    ax.set_ylabel(metric_label, fontsize=LABEL_SIZE)
    ax.grid(alpha=0.3)
    _style(ax)


def _legend_and_title(fig: Figure, title: str) -> None:
    """One legend for both panels, below them (the first panel's entries, then what the
    interval bars and bands mean where the first panel draws any), and the title."""
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    drawn = drawn_intervals(ax)
    if any(c.get_linewidth()[0] < BAND["lw"] for c in drawn):
        handles.append(interval_handle())
    if any(c.get_linewidth()[0] >= BAND["lw"] for c in drawn):
        handles.append(Line2D([], [], color="0.35", label="median run's 95 % bootstrap\ninterval (over the samples)",
                              **BAND))
    labels += [h.get_label() for h in handles[len(labels):]]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=TITLE_SIZE)


def _ranged(ax, summary: pd.DataFrame, metric: str, colour, fmt: str, label: str, dodge: float = 0.0) -> None:
    """Medians with min-max bars over training seeds (vertical: the metric; horizontal: the
    compute) and, behind them, the median run's 95 % interval as a light band where the summary
    has one (``{metric}_lo``/``_hi``; otherwise the bars are the seed range alone), shifted
    ``dodge`` points sideways."""
    x, y = summary["gflops_per_image_median"], summary[f"{metric}_median"]
    interval_bars(ax, x, summary, metric, colour, zorder=2, dodge=dodge, **BAND)
    ax.errorbar(x, y, yerr=[y - summary[f"{metric}_min"], summary[f"{metric}_max"] - y],
                xerr=[x - summary["gflops_per_image_min"], summary["gflops_per_image_max"] - x],
                fmt=fmt, color=colour, capsize=3, ms=6, label=label, zorder=3)


def plot_loss_ratios(table: pd.DataFrame, reference: str, names: list[str] | None = None,
                     confidence: float = 0.95, ax=None) -> Figure:
    """Each model's noise-prediction loss divided by ``reference``'s, per timestep, with a
    ``confidence`` band of the paired difference (evaluation noise: which images and noise).

    ``table``: :func:`~dydit_lab.analysis.loss_gap.per_timestep_loss` rows (``model, t, sample,
    mse``; ``python -m dydit_lab loss-per-t`` writes them). ``names``: the models to draw
    (default: every model but the reference). A ratio of 1 is the reference's loss.
    """
    names = [m for m in table["model"].unique() if m != reference] if names is None else list(names)
    if not names:
        raise ValueError("no models to compare with the reference")
    fig, ax = _axes(ax, figsize=(8, 4.5))
    ratios = []
    for i, name in enumerate(names):
        gap = loss_gap(table, small=name, large=reference, confidence=confidence)
        colour = PALETTE[i % len(PALETTE)]
        ax.fill_between(gap["t"], 1 + gap["gap_lo"] / gap["large"], 1 + gap["gap_hi"] / gap["large"],
                        color=colour, alpha=0.2, lw=0)
        ax.plot(gap["t"], 1 + gap["relative_gap"], "o-", ms=3, color=colour, label=display_name(name))
        ratios.append(1 + gap["relative_gap"].to_numpy())
    ax.axhline(1.0, color="0.3", lw=1, ls="--")
    ax.set_yscale("log")
    _plain_log_ticks(ax, np.concatenate(ratios))
    ax.set_xlabel("timestep t (999: pure noise)", fontsize=LABEL_SIZE)
    ax.set_ylabel(f"loss / {display_name(reference)}'s loss", fontsize=LABEL_SIZE)
    ax.set_title(f"Noise-prediction loss relative to {display_name(reference)} (bands: {confidence:.0%} CI)",
                 fontsize=TITLE_SIZE)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    _style(ax)
    return fig

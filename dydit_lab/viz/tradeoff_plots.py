"""The paper's quality-vs-FLOPs figure over λ, with training seeds (notebook 06): DyDiT's median
over seeds with its min-max range at each λ, next to reference curves (the parent and lab-S at
fewer sampling steps) and control points (the same extra training without routers, ablations)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis.loss_gap import loss_gap
from .gap_plots import _plain_log_ticks
from .plots import LABEL_SIZE, PALETTE, TITLE_SIZE, _axes, _style

PANELS = (("fd_lenet", "FD-LeNet (lower is better)"), ("accuracy", "class accuracy (higher is better)"))


def plot_tradeoff(summary: pd.DataFrame, references: dict[str, pd.DataFrame] | None = None,
                  controls: dict[str, pd.DataFrame] | None = None, label: str = "DyDiT (median of seeds)") -> Figure:
    """FD-LeNet and accuracy vs GFLOPs per image.

    ``summary``: :func:`~dydit_lab.analysis.tradeoff.seed_summary` by ``target_ratio`` (bars: the
    min-max over training seeds; each point labelled with its λ and run count). ``references``:
    name -> rows with ``gflops_per_image`` and the metrics, drawn as lines (e.g. the static parent
    at 10/20/30/50 steps). ``controls``: name -> a seed summary, drawn as single points with ranges.
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for ax, (metric, metric_label) in zip(axes, PANELS):
        for i, (name, rows) in enumerate((references or {}).items()):
            rows = rows.sort_values("gflops_per_image")
            ax.plot(rows["gflops_per_image"], rows[metric], "o--", color=PALETTE[(i + 1) % len(PALETTE)],
                    alpha=0.8, label=name)
        _ranged(ax, summary, metric, PALETTE[0], "s-", label)
        points = zip(summary["target_ratio"], summary["gflops_per_image_median"], summary[f"{metric}_median"],
                     summary["runs"])
        for k, (lam, x, y, runs) in enumerate(points):  # above and below in turn: neighbours' labels stay apart
            ax.annotate(f"λ = {lam:g} ({runs})", (x, y), xytext=(5, 5 if k % 2 == 0 else -11),
                        textcoords="offset points", fontsize=7, color=PALETTE[0])
        for j, (name, rows) in enumerate((controls or {}).items()):
            _ranged(ax, rows, metric, PALETTE[(j + 5) % len(PALETTE)], "D", name)
        _label_compute_axes(ax, metric_label)
    _legend_and_title(fig, "Quality vs compute over the FLOPs target λ (bars: min-max over training seeds)")
    return fig


def plot_recipe_curves(curves: dict[str, pd.DataFrame], references: dict[str, pd.DataFrame] | None = None,
                       by: str = "coarse_steps", title: str = "FlexiDiT fine-tuning recipes") -> Figure:
    """FD-LeNet (log axis) and accuracy vs GFLOPs per image, one line per recipe.

    ``curves``: label -> :func:`~dydit_lab.analysis.tradeoff.seed_summary` by ``by`` (medians, with
    min-max bars over training seeds; the legend gives each recipe's run count), e.g. from
    :func:`~dydit_lab.analysis.tradeoff.recipe_curves`. ``references``: as in :func:`plot_tradeoff`.
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for ax, (metric, metric_label) in zip(axes, PANELS):
        for i, (name, rows) in enumerate((references or {}).items()):
            rows = rows.sort_values("gflops_per_image")
            ax.plot(rows["gflops_per_image"], rows[metric], "o--", color="0.35" if i == 0 else PALETTE[-1 - i],
                    alpha=0.9, label=name)
        for j, (label, summary) in enumerate(curves.items()):
            summary = summary.sort_values("gflops_per_image_median")
            low, high = int(summary["runs"].min()), int(summary["runs"].max())
            seeds = f"{low}-{high} seeds" if low != high else "1 seed" if low == 1 else f"{low} seeds"
            _ranged(ax, summary, metric, PALETTE[j % len(PALETTE)], "s-", f"{label} ({seeds})")
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
    _legend_and_title(fig, f"{title} (bars: min-max over training seeds)")
    return fig


def _label_compute_axes(ax, metric_label: str) -> None:
    ax.set_xlabel("GFLOPs per image (whole sampling run)", fontsize=LABEL_SIZE)
    ax.set_ylabel(metric_label, fontsize=LABEL_SIZE)
    ax.grid(alpha=0.3)
    _style(ax)


def _legend_and_title(fig: Figure, title: str) -> None:
    """One legend for both panels, below them (the first panel's entries), and the title."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=TITLE_SIZE)


def _ranged(ax, summary: pd.DataFrame, metric: str, colour, fmt: str, label: str) -> None:
    """Medians with min-max bars (vertical: the metric; horizontal: the compute)."""
    x, y = summary["gflops_per_image_median"], summary[f"{metric}_median"]
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
        ax.plot(gap["t"], 1 + gap["relative_gap"], "o-", ms=3, color=colour, label=name)
        ratios.append(1 + gap["relative_gap"].to_numpy())
    ax.axhline(1.0, color="0.3", lw=1, ls="--")
    ax.set_yscale("log")
    _plain_log_ticks(ax, np.concatenate(ratios))
    ax.set_xlabel("timestep t (999: pure noise)", fontsize=LABEL_SIZE)
    ax.set_ylabel(f"loss / {reference}'s loss", fontsize=LABEL_SIZE)
    ax.set_title(f"Noise-prediction loss relative to {reference} (bands: {confidence:.0%} CI)", fontsize=TITLE_SIZE)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    _style(ax)
    return fig

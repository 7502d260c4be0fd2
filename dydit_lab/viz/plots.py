"""Figures for the DyDiT analyses: patch loss maps, sample grids, speed-up and quality vs
compute (loss curves and gaps are in :mod:`.gap_plots`, router schedules in :mod:`.routing_plots`).

Headless-safe: nothing here calls ``plt.show()``; every function returns its Figure (which a
notebook displays) and :func:`save_figure` writes and closes it. Colours come from
seaborn's colour-blind-safe palette; loss maps use 'magma' (perceptually uniform).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import offset_copy

from ..analysis.loss_maps import PatchLossMaps, normalize_maps
from ..evaluation.strategies import pareto_front
from .labels import place_labels

__all__ = ["plot_quality_vs_flops", "plot_strategies", "plot_speedup_vs_batch", "plot_speedup_vs_ratio",
           "plot_loss_maps", "plot_sample_grid", "save_figure", "interval_bars", "display_name"]

PALETTE = sns.color_palette("colorblind")
T_LABEL = "timestep t (0 = clean, 999 = pure noise)"
TITLE_SIZE, LABEL_SIZE, TICK_SIZE = 12, 11, 9


def _style(ax: Axes) -> None:
    # Tick labels are created at draw time, so set their size on the axes, not via rcParams.
    ax.tick_params(labelsize=TICK_SIZE)


def _axes(ax: Axes | None, figsize=(6, 4)) -> tuple[Figure, Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def display_name(name: str) -> str:
    """A row or trace name as a figure shows it ("lambda = 0.5" -> "λ = 0.5")."""
    return str(name).replace("lambda", "λ")


def _image_array(img) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) in [0, 1] for imshow."""
    arr = torch.as_tensor(img).detach().float().cpu().clamp(-1, 1).add(1).div(2).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


# ---------------------------------------------------------------------------
# Loss maps (Figure 1(b))
# ---------------------------------------------------------------------------


def plot_loss_maps(result: PatchLossMaps, images, labels=None, *, normalize: bool = True,
                   outline: bool = True, cmap: str = "magma", fig: Figure | None = None,
                   title: str | None = None) -> Figure:
    """Grid of clean image, then x_t and the patch loss map for each timestep, per image.

    Rows are images; column 1 is the clean image, then for every t in ``result.timesteps``
    the noisy input x_t (clipped to [-1, 1] for display) and its loss map. Maps are min-max
    normalised per map (``normalize=True``: where the loss sits, not how large it is) or
    shown on one shared scale. ``outline`` draws the digit's contour over the maps.
    Axes: ``len(images) * (1 + 2 * len(timesteps))`` panels plus one colourbar.
    """
    images = torch.as_tensor(images).float().cpu()
    maps = normalize_maps(result.maps) if normalize else result.maps.float()
    N, T = maps.shape[:2]
    if len(images) != N:
        raise ValueError(f"{len(images)} images for maps of {N} images")
    H, W = images.shape[-2:]
    vmax = 1.0 if normalize else float(maps.max())
    if fig is None:
        fig = plt.figure(figsize=(1.25 * (1 + 2 * T) + 1.0, 1.35 * N + 0.7), layout="constrained")
    grid = fig.subplots(N, 1 + 2 * T, squeeze=False)
    for i in range(N):
        grid[i, 0].imshow(_image_array(images[i]), cmap="gray", vmin=0, vmax=1)
        grid[i, 0].set_ylabel(f"label {int(labels[i])}" if labels is not None else f"image {i}",
                              fontsize=LABEL_SIZE)
        for j, t in enumerate(result.timesteps):
            ax_x, ax_m = grid[i, 1 + 2 * j], grid[i, 2 + 2 * j]
            ax_x.imshow(_image_array(result.x_t[i, j]), cmap="gray", vmin=0, vmax=1)
            # extent in pixel units so the digit outline lands on the right patches
            mappable = ax_m.imshow(maps[i, j].numpy(), cmap=cmap, vmin=0, vmax=vmax,
                                   interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
            if outline and images[i].min() < 0 < images[i].max():  # no contour otherwise
                ax_m.contour(images[i].mean(0).numpy(), levels=[0.0], colors="cyan",
                             linewidths=0.8)
            if i == 0:
                ax_x.set_title(f"t = {t}\nx_t", fontsize=TICK_SIZE + 1)
                ax_m.set_title(f"t = {t}\nloss map", fontsize=TICK_SIZE + 1)
    grid[0, 0].set_title("clean x_0", fontsize=TICK_SIZE + 1)
    for ax in grid.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(mappable, ax=grid.ravel().tolist(), shrink=0.8)
    cbar.set_label("patch loss (min-max per map)" if normalize else "patch ε-MSE (per pixel)",
                   fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


# ---------------------------------------------------------------------------
# Sample grids and saving
# ---------------------------------------------------------------------------


def plot_sample_grid(images, labels=None, nrow: int = 10, *,
                     class_names: Sequence[str] | None = None, pad: int = 2,
                     ax: Axes | None = None, title: str | None = None) -> Figure:
    """Digits in [-1, 1] tiled on one Axes, ``nrow`` images per row, in grey.

    With ``labels`` each tile is captioned by its label (or ``class_names[label]``).
    """
    images = torch.as_tensor(images).float().cpu()
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    N, _, H, W = images.shape
    ncol = max(1, min(nrow, N))
    nrows = -(-N // ncol)
    top = 10 if labels is not None else pad  # room above each tile for its caption
    cell_h, cell_w = H + top, W + pad
    rgb = images.shape[1] == 3
    canvas = np.ones((nrows * cell_h + pad, ncol * cell_w + pad) + ((3,) if rgb else ()))
    for k in range(N):
        r, c = divmod(k, ncol)
        y0, x0 = r * cell_h + top, c * cell_w + pad
        canvas[y0:y0 + H, x0:x0 + W] = _image_array(images[k])
    if ax is None:
        fig = plt.figure(figsize=(0.75 * ncol + 0.3, 0.75 * nrows * cell_h / H + 0.4),
                         layout="constrained")
        ax = fig.add_subplot()
    ax.imshow(canvas, cmap=None if rgb else "gray", vmin=0, vmax=1, interpolation="nearest")
    if labels is not None:
        for k, label in enumerate(torch.as_tensor(labels).tolist()):
            r, c = divmod(k, ncol)
            text = class_names[label] if class_names is not None else str(label)
            ax.text(c * cell_w + pad + W / 2, r * cell_h + top / 2 + 0.5, text, ha="center",
                    va="center", fontsize=TICK_SIZE)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=TITLE_SIZE)
    return ax.figure


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` as PNG (tight bounding box), creating parent folders; close it; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Speed-up and quality vs compute
# ---------------------------------------------------------------------------


SPEEDUP_TARGET = 0.97  # the fraction of the ideal speed-up DiT-XL/2 should reach on CPU (issue 18)


def _finish_speedup_axes(ax: Axes, x_label: str, title: str, legend_size: float, below: bool = False) -> None:
    """The no-speed-up line, labels, legend and style shared by the speed-up plots; ``below``
    puts the legend under the axes (many series would cover the curves)."""
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlabel(x_label, fontsize=LABEL_SIZE)
    ax.set_ylabel("speed-up over the static DiT (x)", fontsize=LABEL_SIZE)
    ax.set_title(title, fontsize=TITLE_SIZE)
    if below:
        ax.legend(fontsize=legend_size, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        ax.legend(fontsize=legend_size)
    _style(ax)


def _cpu_threads(table: pd.DataFrame) -> pd.Series:
    """Each timing's CPU thread count (0 where unknown, and on a GPU, where the host's thread
    count says nothing of its speed): runs at different counts are never one series."""
    threads = table["num_threads"] if "num_threads" in table else pd.Series(0, index=table.index)
    return threads.where(table["device"].astype(str).str.startswith("cpu"), 0).fillna(0).astype(int)


def _where(device: str, threads: int) -> str:
    """A series' device in a legend: ``cpu, 2 threads``, or the device alone."""
    return f"{device}, {threads} thread{'s' if threads != 1 else ''}" if threads else device


def plot_speedup_vs_ratio(bench: pd.DataFrame, paper: pd.DataFrame | None = None,
                          ax: Axes | None = None, lab: pd.DataFrame | None = None) -> Figure:
    """Measured speed-up vs FLOPs fraction (sliced and masked), the ideal 1/x, paper points,
    and trained lab DyDiTs (``lab``: one marker per device and thread count)."""
    fig, ax = _axes(ax)
    x = np.linspace(0.3, 1.0, 100)
    ax.plot(x, 1 / x, color="black", ls=":", lw=1.2, label="ideal: 1 / FLOPs fraction")
    ax.plot(x, SPEEDUP_TARGET / x, color="grey", ls=":", lw=1, label=f"target: {SPEEDUP_TARGET} x ideal")
    markers = {"cpu": "o", "cuda": "s"}
    for j, (device, rows) in enumerate(bench.groupby(bench["device"].astype(str).str.split(":").str[0])):
        m = markers.get(device, "^")
        ax.scatter(rows["flops_ratio"], rows["speedup"], marker=m, s=50, color=PALETTE[0],
                   label=f"sliced DyDiT ({device})", zorder=3)
        ax.scatter(rows["flops_ratio"], rows["masked_speedup"], marker=m, s=50, color=PALETTE[3],
                   label=f"masked, official-style ({device})", zorder=3)
    if lab is not None and not lab.empty:
        for i, ((device, n), rows) in enumerate(lab.groupby([lab["device"].astype(str), _cpu_threads(lab)])):
            where = _where(device, n)
            ax.scatter(rows["flops_ratio"], rows["speedup"], marker="D", s=45, facecolor="none",
                       edgecolor=PALETTE[(4 + i) % len(PALETTE)], lw=1.5, zorder=3,
                       label=f"trained lab DyDiT ({where})")
    if paper is not None:
        ax.scatter(paper["flops_ratio"], paper["speedup"], marker="*", s=160, color=PALETTE[2],
                   label="DyDiT-XL paper (V100)", zorder=4)
    _finish_speedup_axes(ax, "FLOPs fraction of the static DiT", "Wall-clock speed-up vs FLOPs", legend_size=8)
    return fig


def _run_ranges(rows: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, the lowest and highest speed-up of the separate runs (``speedup_runs``,
    ``bench --runs N``) of ``rows``; batches without runs are left out."""
    if "speedup_runs" not in rows:
        return pd.DataFrame(columns=["batch_size", "lo", "hi"])
    runs = rows[["batch_size", "speedup_runs"]].dropna().explode("speedup_runs")
    runs = runs.astype({"speedup_runs": float})
    return runs.groupby("batch_size", as_index=False)["speedup_runs"].agg(lo="min", hi="max")


def plot_speedup_vs_batch(bench: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Speed-up vs batch size, one series per device, target and thread count (runs at
    different thread counts are never merged into one point); log-2 batch axis. Where a row
    holds separate runs (``speedup_runs``), a bar spans their lowest to highest speed-up."""
    fig, ax = _axes(ax)
    keys = [bench["device"].astype(str), bench["target_ratio"].round(2), _cpu_threads(bench)]
    for i, ((device, target, n), rows) in enumerate(bench.groupby(keys)):
        ranges = _run_ranges(rows)
        rows = rows.groupby("batch_size", as_index=False)[["speedup", "masked_speedup"]].median()
        color = PALETTE[i % len(PALETTE)]
        where = _where(device, n)
        if len(ranges):
            ax.vlines(ranges["batch_size"], ranges["lo"], ranges["hi"], colors=[color], lw=3, alpha=0.45,
                      gid="run_range")
        ax.plot(rows["batch_size"], rows["speedup"], "o-", color=color,
                label=f"sliced, ratio {target}, {where}")
        ax.plot(rows["batch_size"], rows["masked_speedup"], "x--", color=color, alpha=0.7,
                label=f"masked, ratio {target}, {where}")
        ax.axhline(1 / target, color=color, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    title = "Speed-up vs batch size (dotted: ideal" + ("; bars: lowest to highest of the runs)"
                                                        if any(c.get_gid() == "run_range" for c in ax.collections)
                                                        else ")")
    _finish_speedup_axes(ax, "batch size (images)", title, legend_size=7, below=True)
    return fig


INTERVAL_NOTE = "bars: 95 % bootstrap intervals over the generated samples"


def interval_bars(ax: Axes, x, table: pd.DataFrame, metric: str, colour, *, lw: float = 1.2,
                  alpha: float = 0.45, zorder: float = 2, dodge: float = 0.0):
    """Each row's 95 % bootstrap interval of ``metric`` (columns ``{metric}_lo`` and
    ``{metric}_hi``, over the generated samples) as a vertical bar without caps at ``x``
    (shifted ``dodge`` points sideways: series that share x values stay apart), in ``colour``,
    light. Rows without an interval (or a table without the columns) get none.
    Returns the LineCollection (gid ``"interval"``), or None when no row has an interval."""
    lo_column, hi_column = f"{metric}_lo", f"{metric}_hi"
    if lo_column not in table or hi_column not in table:
        return None
    x = np.asarray(x, float)
    lo = pd.to_numeric(table[lo_column], errors="coerce").to_numpy(float)
    hi = pd.to_numeric(table[hi_column], errors="coerce").to_numpy(float)
    keep = np.isfinite(x) & np.isfinite(lo) & np.isfinite(hi)
    if not keep.any():
        return None
    shifted = offset_copy(ax.transData, fig=ax.figure, x=dodge, units="points") if dodge else ax.transData
    return ax.vlines(x[keep], lo[keep], hi[keep], colors=[colour], lw=lw, alpha=alpha, zorder=zorder,
                     gid="interval", transform=shifted)


def drawn_intervals(ax: Axes) -> list:
    """The :func:`interval_bars` collections drawn on ``ax`` (what a legend entry describes)."""
    return [c for c in ax.collections if c.get_gid() == "interval"]


def interval_handle(lw: float = 1.2, alpha: float = 0.45) -> Line2D:
    """A legend entry for :func:`interval_bars` (grey: each series draws its own colour)."""
    return Line2D([], [], color="0.35", lw=lw, alpha=alpha, label="95 % bootstrap interval\n(over the samples)")


def plot_quality_vs_flops(table: pd.DataFrame) -> Figure:
    """FD-LeNet (lower is better) and class accuracy vs GFLOPs per sampling step, each point
    with its 95 % bootstrap interval over the generated samples where the row has one."""
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, column, label in ((ax_fd, "fd_lenet", "FD-LeNet (lower is better)"),
                              (ax_acc, "accuracy", "class accuracy")):
        ax.scatter(table["gflops_per_step"], table[column], s=60, color=PALETTE[0], zorder=3)
        interval_bars(ax, table["gflops_per_step"], table, column, PALETTE[0], lw=1.5)
        ax.set_xlabel("GFLOPs per image per sampling step", fontsize=LABEL_SIZE)
        ax.set_ylabel(label, fontsize=LABEL_SIZE)
        _style(ax)
    fig.suptitle(f"Quality vs compute ({INTERVAL_NOTE})", fontsize=TITLE_SIZE)
    for ax, column in ((ax_fd, "fd_lenet"), (ax_acc, "accuracy")):
        place_labels(ax, list(zip(table["gflops_per_step"], table[column])),
                     [display_name(n) for n in table["name"]], fontsize=8)
    return fig


STRATEGY_MARKERS = {"static": "o", "DyDiT": "s", "FlexiDiT": "^"}


def _series_colours(names) -> dict:
    """One colour per series (the colour-blind palette, then tab20 when there are more)."""
    names = list(dict.fromkeys(names))
    colours = PALETTE if len(names) <= len(PALETTE) else sns.color_palette("tab20", len(names))
    return dict(zip(names, colours))


def plot_strategies(table: pd.DataFrame) -> Figure:
    """Quality (FD-LeNet, class accuracy) vs compute (GFLOPs per image) and vs measured
    wall-clock per image: one line per strategy series (a caching policy is its own series),
    the Pareto front over every point drawn behind, and each point's 95 % bootstrap interval
    over the generated samples (a light bar in the series' colour; none where a row has none).
    FD panels label every point by its setting; accuracy panels, where most points crowd into a
    few hundredths, only the front and the DyDiT families (the colours and the FD panels name
    the rest). Labels are placed by :func:`~dydit_lab.viz.labels.place_labels` (none overlap)."""
    fig, axes = plt.subplots(2, 2, figsize=(14, 10), layout="constrained")
    panels = [("gflops_per_image", "GFLOPs per image (whole sampling run)"),
              ("seconds_per_image", "CPU wall-clock per image (s)")]
    metrics = [("fd_lenet", "FD-LeNet (log scale, lower is better)", False),
               ("accuracy", "class accuracy (higher is better)", True)]
    series = table["series"] if "series" in table else table["strategy"]
    colours = _series_colours(series)
    labels = {}
    for row, (metric, metric_label, higher) in zip(axes, metrics):
        for ax, (x, x_label) in zip(row, panels):
            front = pareto_front(list(table[x]), list(table[metric]), higher_is_better=higher)
            ax.step(table[x].iloc[front], table[metric].iloc[front], where="post", color="grey", lw=5,
                    alpha=0.3, zorder=1, label="Pareto front")
            on_front = set(table.index[front])
            labels[ax] = []
            for name, group in table.groupby(series, sort=False):
                group = group.sort_values(x)
                family = group["strategy"].iloc[0]
                ax.plot(group[x], group[metric], marker=STRATEGY_MARKERS.get(family, "D"), ms=6,
                        color=colours[name], label=display_name(name), zorder=3)
                interval_bars(ax, group[x], group, metric, colours[name])
                labels[ax].extend((r[x], r[metric], display_name(r["setting"]), colours[name])
                                  for i, r in group.iterrows()
                                  if not higher or i in on_front or family.startswith("DyDiT"))
            ax.set_xlabel(x_label, fontsize=LABEL_SIZE)
            ax.set_ylabel(metric_label, fontsize=LABEL_SIZE)
            if metric == "fd_lenet":  # FDs span two decades once caching breaks down: ratios compare
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
            _style(ax)
    handles, names = axes[0][0].get_legend_handles_labels()
    if any(drawn_intervals(ax) for ax in axes.flat):
        handles.append(interval_handle())
        names.append(handles[-1].get_label())
    fig.legend(handles, names, title="strategy", loc="outside right center", fontsize=8)
    families = ", ".join(dict.fromkeys(table["strategy"]))
    fig.suptitle(f"Spending less compute per image: {families}", fontsize=TITLE_SIZE)
    for ax, placed in labels.items():  # last: the legend and titles settle where the axes sit
        place_labels(ax, [(a, b) for a, b, _, _ in placed], [t for _, _, t, _ in placed],
                     [c for _, _, _, c in placed], fontsize=6.5)
    return fig

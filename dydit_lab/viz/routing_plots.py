"""Figures of what a trained DyDiT's routers do: width heat maps (of a sampling run or of the
learned schedule at every timestep), token keep rates and maps (over MNIST digits or a VAE's
decoded images), FLOPs per step, the explorer's dashboard, and what the skipping measured on a
device. Headless-safe, like :mod:`.plots`."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure

from ..analysis.routing import RoutingTrace, WidthSchedule
from .plots import LABEL_SIZE, PALETTE, T_LABEL, TITLE_SIZE, _axes, _image_array, _style, display_name

LEGEND_BLOCKS = 12  # up to this depth the keep-rate plot names every block in a legend


# ---------------------------------------------------------------------------
# Router schedules (what a trained DyDiT does over a sampling run)
# ---------------------------------------------------------------------------


def plot_width_heatmap(trace: RoutingTrace | WidthSchedule, kind: str = "heads", ax: Axes | None = None,
                       step: int | None = None) -> Figure:
    """Active share of attention heads (or MLP groups) per block vs timestep, as a heatmap.

    TDW reads only the timestep, so every sample at one step has the same width; the value
    shown is the batch mean all the same. A vertical line marks ``step`` when given.
    """
    if kind not in ("heads", "groups"):
        raise ValueError(f"kind must be 'heads' or 'groups', got {kind!r}")
    fig, ax = _axes(ax)
    units = getattr(trace, kind).shape[-1]
    active = getattr(trace, kind).float().sum(-1).mean(dim=1).T.numpy()  # (depth, S) units on
    t = np.array(trace.timesteps)
    extent = (t.max(), t.min(), active.shape[0] - 0.5, -0.5) if len(t) > 1 else None
    # Whole heads / groups switch: units + 1 discrete levels, one colour each.
    levels = BoundaryNorm(np.arange(-0.5, units + 1), units + 1)
    im = ax.imshow(active, aspect="auto", cmap=plt.get_cmap("viridis", units + 1), norm=levels,
                   extent=extent, interpolation="nearest")
    ax.invert_xaxis()  # t from 0 (left) to 999 (right), like the loss curves
    ax.set_yticks(range(active.shape[0]))
    if step is not None:
        ax.axvline(trace.timesteps[step], color="white", lw=1.5, ls="--")
    ax.set_xlabel(T_LABEL, fontsize=LABEL_SIZE)
    ax.set_ylabel("block", fontsize=LABEL_SIZE)
    unit = "attention heads" if kind == "heads" else "MLP channel groups"
    ax.set_title(f"{display_name(trace.name)}: active {unit}", fontsize=TITLE_SIZE)
    fig.colorbar(im, ax=ax, label=f"active (of {units})", ticks=range(0, units + 1, max(1, units // 8)))
    _style(ax)
    return fig


def plot_token_keep(trace: RoutingTrace, highlight_layer: int | None = None,
                    ax: Axes | None = None, step: int | None = None) -> Figure:
    """SDT keep-rate (share of tokens that run the MLP) of every block vs timestep."""
    fig, ax = _axes(ax)
    keep = trace.tokens.float().mean(dim=(1, 3)).numpy()  # (S, depth)
    colors = sns.color_palette("viridis", keep.shape[1])
    for layer in range(keep.shape[1]):
        bold = highlight_layer is None or layer == highlight_layer
        ax.plot(trace.timesteps, keep[:, layer], color=colors[layer], lw=2.2 if bold else 0.8,
                alpha=1.0 if bold else 0.45, label=f"block {layer}")
    if step is not None:
        ax.axvline(trace.timesteps[step], color="grey", lw=1, ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(T_LABEL, fontsize=LABEL_SIZE)
    ax.set_ylabel("tokens kept (share)", fontsize=LABEL_SIZE)
    ax.set_title(f"{display_name(trace.name)}: SDT keep-rate per block", fontsize=TITLE_SIZE)
    if keep.shape[1] <= LEGEND_BLOCKS:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:  # a deep model (DiT-XL: 28 blocks): a colour bar, not 28 legend rows
        blocks = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, keep.shape[1] - 1))
        fig.colorbar(blocks, ax=ax, label="block")
    _style(ax)
    return fig


def plot_token_map(trace: RoutingTrace, step: int = 0, sample: int = 0, layer: int = 0,
                   ax: Axes | None = None) -> Figure:
    """The final sample (the digit, or the VAE-decoded image, being generated) with the tokens
    SDT dropped in one block at one step shaded: which parts of the image skip the MLP (x_t
    itself is mostly noise). Latents without a VAE to decode them: the keep mask alone."""
    fig, ax = _axes(ax, figsize=(4, 4))
    keep = trace.token_grid(step, sample, layer).float().numpy()
    image = trace.samples[sample]
    label = int(trace.labels[sample])
    if image.shape[0] in (1, 3):
        ax.imshow(_image_array(image), cmap="gray", vmin=0, vmax=1)
        pixels = image.shape[-1] // keep.shape[-1]  # image pixels per token along a side
        dropped = np.kron(1 - keep, np.ones((pixels, pixels)))
        overlay = np.zeros(dropped.shape + (4,))
        overlay[..., 0], overlay[..., 3] = 1.0, 0.55 * dropped  # red = skips the MLP
        ax.imshow(overlay)
        shown = (f"red: skips the MLP; over the final digit {label}" if image.shape[0] == 1 else
                 f"red: skips the MLP; over the decoded image, class {label}")
    else:
        ax.imshow(keep, cmap="gray", vmin=0, vmax=1)
        shown = f"white: runs the MLP; class {label}, no VAE to decode the latents"
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"t = {trace.timesteps[step]}, block {layer}: {int(keep.sum())}/{keep.size} "
                 f"tokens kept\n({shown})", fontsize=TITLE_SIZE - 2)
    return fig


def plot_flops_per_step(traces: RoutingTrace | Sequence[RoutingTrace], ax: Axes | None = None,
                        step: int | None = None) -> Figure:
    """Whole-model FLOPs fraction (of the static DiT) at every sampling step, per trace."""
    traces = [traces] if isinstance(traces, RoutingTrace) else list(traces)
    fig, ax = _axes(ax)
    for i, trace in enumerate(traces):
        ax.plot(trace.timesteps, trace.flops_fraction.numpy(), color=PALETTE[i % len(PALETTE)],
                lw=2, label=f"{display_name(trace.name)} (mean {trace.mean_flops_fraction:.3f})")
    if step is not None:
        ax.axvline(traces[0].timesteps[step], color="grey", lw=1, ls="--")
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(T_LABEL, fontsize=LABEL_SIZE)
    ax.set_ylabel("FLOPs / static DiT", fontsize=LABEL_SIZE)
    ax.set_title("FLOPs per sampling step", fontsize=TITLE_SIZE)
    ax.legend(fontsize=8)
    _style(ax)
    return fig


def plot_router_dashboard(trace: RoutingTrace, step: int = 0, layer: int = 0, sample: int = 0,
                          fig: Figure | None = None) -> Figure:
    """Four panels for one (step, block, sample): head widths, keep-rates, token map, FLOPs."""
    fig = fig or plt.figure(figsize=(12, 8), layout="constrained")
    fig.clear()
    axes = fig.subplots(2, 2)
    plot_width_heatmap(trace, "heads", ax=axes[0, 0], step=step)
    plot_token_keep(trace, highlight_layer=layer, ax=axes[0, 1], step=step)
    plot_token_map(trace, step, sample, layer, ax=axes[1, 0])
    plot_flops_per_step(trace, ax=axes[1, 1], step=step)
    fig.suptitle(f"{display_name(trace.name)} | step {step + 1}/{len(trace.timesteps)} (t = {trace.timesteps[step]})"
                 f" | block {layer} | sample {sample}", fontsize=TITLE_SIZE + 1)
    return fig


def plot_width_curves(traces: Sequence[RoutingTrace], ax: Axes | None = None) -> Figure:
    """Mean active share of heads (solid) and MLP groups (dashed) over all blocks vs t."""
    fig, ax = _axes(ax)
    for i, trace in enumerate(traces):
        color = PALETTE[i % len(PALETTE)]
        ax.plot(trace.timesteps, trace.heads.float().mean(dim=(1, 2, 3)).numpy(), color=color,
                lw=2, label=f"{display_name(trace.name)}: heads")
        ax.plot(trace.timesteps, trace.groups.float().mean(dim=(1, 2, 3)).numpy(), color=color,
                lw=2, ls="--", label=f"{display_name(trace.name)}: MLP groups")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(T_LABEL, fontsize=LABEL_SIZE)
    ax.set_ylabel("active share (all blocks)", fontsize=LABEL_SIZE)
    ax.set_title("TDW width vs timestep", fontsize=TITLE_SIZE)
    ax.legend(fontsize=8, loc="lower left")
    _style(ax)
    return fig


def plot_width_schedules(schedules: dict[str, WidthSchedule]) -> Figure:
    """The learned TDW schedule of each model at every timestep: active heads and MLP groups
    per block (one row per model)."""
    fig = plt.figure(figsize=(13, 4 * len(schedules)), layout="constrained")
    rows = fig.subplots(len(schedules), 2, squeeze=False)
    for row, schedule in zip(rows, schedules.values()):
        plot_width_heatmap(schedule, "heads", ax=row[0])
        plot_width_heatmap(schedule, "groups", ax=row[1])
    fig.suptitle("Learned width schedule: every timestep, from the routers alone", fontsize=TITLE_SIZE + 1)
    return fig


# ---------------------------------------------------------------------------
# What the skipping measured on a device
# ---------------------------------------------------------------------------


def plot_measured_speedup(record: dict, ax: Axes | None = None) -> Figure:
    """Seconds per sampling step of the static model, the sliced DyDiT and the official-style
    masked DyDiT (``record``: :func:`dydit_lab.bench.checkpoint.checkpoint_speedup`), each
    labelled with its speed-up; the dotted line is the static time x the FLOPs fraction."""
    fig, ax = _axes(ax, figsize=(6.5, 4))
    paths = [("static (every gate on)", record["static_seconds"], 1.0),
             ("sliced DyDiT", record["dynamic_seconds"], record["speedup"]),
             ("masked, official-style", record["masked_seconds"], record["masked_speedup"])]
    bars = ax.bar([p[0] for p in paths], [p[1] for p in paths], color=[PALETTE[2], PALETTE[0], PALETTE[3]])
    for bar, (_, seconds, speedup) in zip(bars, paths):
        ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, seconds), ha="center",
                    va="bottom", fontsize=LABEL_SIZE)
    ideal = record["static_seconds"] * record["flops_ratio"]
    ax.axhline(ideal, color="black", ls=":", lw=1.2, label=f"ideal (FLOPs fraction {record['flops_ratio']:.3f})")
    ax.set_ylabel("seconds per sampling step", fontsize=LABEL_SIZE)
    ax.set_title(f"{display_name(record['name'])} on {record['device_name']} ({record['device']}), "
                 f"batch {record['batch_size']}", fontsize=TITLE_SIZE)
    ax.legend(fontsize=8)
    _style(ax)
    return fig

"""Figures of the caching peers (notebook 05): what each policy reused at every step and how far
its samples drifted from the plain sampler's."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
import matplotlib.pyplot as plt

from ..caching.drift import CachingDrift
from ..evaluation.strategies import policy_name
from .plots import LABEL_SIZE, TITLE_SIZE, _series_colours, _style

ERROR_FLOOR = 1e-5  # a log axis cannot show the exact zeros of steps that match the plain run


def plot_caching_drift(drift: CachingDrift) -> Figure:
    """Three panels: the share of a static step's FLOPs each setting spent at every step (where
    it reused), the distance of its x_t from the plain run's after every step, and the final
    samples' distance against the whole run's FLOPs fraction, one colour per policy."""
    summary, per_step = drift.summary, drift.per_step
    policies = {row.setting: policy_name(row.spec) for row in summary.itertuples()}
    colours = _series_colours(policies.values())
    fig, (ax_map, ax_err, ax_final) = plt.subplots(1, 3, figsize=(17, 0.28 * len(summary) + 3.2),
                                                   layout="constrained", width_ratios=(1.3, 1, 1))

    spent = per_step.pivot(index="setting", columns="step", values="flops_fraction").loc[list(summary.setting)]
    image = ax_map.imshow(spent.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax_map.set_yticks(range(len(spent)), spent.index, fontsize=8)
    ax_map.set_xlabel("sampling step (0 = noisiest)", fontsize=LABEL_SIZE)
    ax_map.set_title("compute spent per step", fontsize=TITLE_SIZE)
    fig.colorbar(image, ax=ax_map, shrink=0.8).set_label("share of a static step's FLOPs", fontsize=9)

    for setting, group in per_step.groupby("setting", sort=False):
        ax_err.plot(group.step, np.maximum(group.error, ERROR_FLOOR), color=colours[policies[setting]],
                    lw=1.2, alpha=0.8)
    ax_err.set_yscale("log")
    ax_err.set_xlabel("sampling step (0 = noisiest)", fontsize=LABEL_SIZE)
    ax_err.set_ylabel("‖x_t − plain x_t‖ / ‖plain x_t‖", fontsize=LABEL_SIZE)
    ax_err.set_title("drift from the plain trajectory", fontsize=TITLE_SIZE)

    for policy, group in summary.groupby(summary.setting.map(policies), sort=False):
        group = group.sort_values("flops_fraction")
        ax_final.plot(group.flops_fraction, np.maximum(group.final_error, ERROR_FLOOR), marker="o",
                      color=colours[policy], label=policy)
        for row in group.itertuples():
            ax_final.annotate(row.setting.removeprefix(policy).strip(), (row.flops_fraction, max(row.final_error, ERROR_FLOOR)),
                              fontsize=7, color=colours[policy], xytext=(4, 2), textcoords="offset points")
    ax_final.set_yscale("log")
    ax_final.set_xlabel("FLOPs of the sampling run / static", fontsize=LABEL_SIZE)
    ax_final.set_ylabel("final samples' distance from the plain ones", fontsize=LABEL_SIZE)
    ax_final.set_title("error for compute saved", fontsize=TITLE_SIZE)
    ax_final.legend(title="policy", fontsize=8)
    ax_final.margins(x=0.12)  # room for the settings written right of their points
    for ax in (ax_map, ax_err, ax_final):
        _style(ax)
    for ax in (ax_err, ax_final):
        ax.grid(alpha=0.3)
    return fig

"""Where a sampling step's wall-clock time goes, stage by stage (``bench --profile stages``
results, :mod:`dydit_lab.bench.stages`): the static pass, the sliced pass and the sliced pass
each routed stage would allow if it shrank exactly with its routing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..paths import BENCH_DIR
from .plots import LABEL_SIZE, PALETTE, TITLE_SIZE, _style

STAGES_DIR = BENCH_DIR / "stages"
PATHS = (("static_ms", "static", PALETTE[7]), ("sliced_ms", "sliced", PALETTE[0]),
         ("ideal_ms", "stage ideal", PALETTE[2]))


def setting_label(result: dict) -> str:
    """'DiT-XL/2, target 0.5, batch 1' or 'DyDiT-lab-L-0.5, batch 100'."""
    target = f", target {result['target_ratio']}" if "target_ratio" in result else ""
    return f"{result['arch']}{target}, batch {result['batch_size']}"


def load_stage_breakdowns(folder: str | Path = STAGES_DIR) -> list[dict]:
    """Every ``bench --profile stages --json`` result in ``folder``, in file-name order."""
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no stage breakdowns in {folder}: run python -m dydit_lab bench "
                                f"--profile stages --json {Path(folder) / 'name.json'}")
    results = [json.loads(path.read_text()) for path in paths]
    for path, result in zip(paths, results):
        if result.get("kind") != "stages":
            raise ValueError(f"{path} is not a stage breakdown (bench --profile stages)")
    return results


def stage_summary(results: Sequence[dict]) -> pd.DataFrame:
    """One row per breakdown: FLOPs fraction, the speed-up measured in it, its fraction of the
    FLOPs ideal, the fraction exact per-stage shrinking would reach, the sliced pass against
    that stage ideal, and the masked path's speed-up (below 1: slower than static; NaN in a
    breakdown that did not time it)."""
    return pd.DataFrame([{
        "setting": setting_label(r), "threads": r["num_threads"], "flops_fraction": r["flops_fraction"],
        "heads_on": r["fractions"]["heads"], "tokens_kept": r["fractions"]["tokens"],
        "mlp_elements": r["fractions"]["mlp"], "speedup": r["static_ms"] / r["sliced_ms"],
        "of_flops_ideal": r["efficiency"], "stage_ceiling": r["stage_ceiling"],
        "of_stage_ideal": r["of_stage_ideal"],
        "masked_speedup": r["static_ms"] / r["masked_ms"] if "masked_ms" in r else float("nan")} for r in results])


def stage_ratios(results: Sequence[dict]) -> pd.DataFrame:
    """Sliced over static time of every stage both passes run (columns, forward order), one row
    per breakdown: compare with the routed fractions of :func:`stage_summary`."""
    return pd.DataFrame({setting_label(r): {row["stage"]: row["sliced_ms"] / row["static_ms"]
                                            for row in r["stages"] if row["static_ms"] > 0}
                         for r in results}).T


def plot_stage_breakdown(results: Sequence[dict]) -> Figure:
    """One column per breakdown. Top: milliseconds per sampling step of each stage, static vs
    sliced vs the stage ideal (log scale, so small stages show). Bottom: what the sliced pass
    loses (right, red) or gains (left, light blue) against the stage ideal, stage by stage."""
    if not results:
        raise ValueError("no stage breakdowns to plot")
    fig, axes = plt.subplots(2, len(results), figsize=(5.4 * len(results), 7.6), layout="constrained",
                             squeeze=False, sharey=True, height_ratios=(3, 2))
    for column, result in enumerate(results):
        rows = result["stages"]
        y = np.arange(len(rows))
        ax_time, ax_gap = axes[0][column], axes[1][column]
        height = 0.8 / len(PATHS)
        for i, (key, label, colour) in enumerate(PATHS):
            ax_time.barh(y + (i - 1) * height, [row[key] for row in rows], height, color=colour, label=label)
        ax_time.set_xscale("log")
        ax_time.set_xlabel("ms per sampling step (log scale)", fontsize=LABEL_SIZE)
        ax_time.set_title(f"{setting_label(result)}\nof FLOPs ideal {result['efficiency']:.2f}, "
                          f"stage ceiling {result['stage_ceiling']:.2f}", fontsize=TITLE_SIZE - 1)
        excess = [row["sliced_ms"] - row["ideal_ms"] for row in rows]
        ax_gap.barh(y, excess, 0.6, color=[PALETTE[3] if e > 0 else PALETTE[9] for e in excess])
        ax_gap.axvline(0, color="0.3", lw=0.8)
        ax_gap.set_xlabel("sliced - stage ideal (ms per step)", fontsize=LABEL_SIZE)
        ax_gap.set_title(f"sliced pass {result['of_stage_ideal']:.2f} of the stage ideal", fontsize=TITLE_SIZE - 1)
        for ax in (ax_time, ax_gap):
            ax.set_yticks(y, [row["stage"] for row in rows])
            _style(ax)
    axes[0][0].invert_yaxis()  # shared y: forward order top to bottom in every panel
    axes[0][0].legend(fontsize=LABEL_SIZE - 2, loc="lower right")
    return fig

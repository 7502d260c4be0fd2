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
    FLOPs ideal, the fraction exact per-stage shrinking would reach, and the sliced pass
    against that stage ideal."""
    return pd.DataFrame([{
        "setting": setting_label(r), "threads": r["num_threads"], "flops_fraction": r["flops_fraction"],
        "speedup": r["static_ms"] / r["sliced_ms"], "of_flops_ideal": r["efficiency"],
        "stage_ceiling": r["stage_ceiling"], "of_stage_ideal": r["of_stage_ideal"]} for r in results])


def plot_stage_breakdown(results: Sequence[dict]) -> Figure:
    """One panel per breakdown: milliseconds per sampling step of each stage, static vs sliced
    vs the stage ideal (horizontal bars, stages top to bottom in forward order)."""
    if not results:
        raise ValueError("no stage breakdowns to plot")
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), layout="constrained",
                             squeeze=False)
    for ax, result in zip(axes[0], results):
        rows = result["stages"]
        y = np.arange(len(rows))
        height = 0.8 / len(PATHS)
        for i, (key, label, colour) in enumerate(PATHS):
            ax.barh(y + (i - 1) * height, [row[key] for row in rows], height, color=colour, label=label)
        ax.set_yticks(y, [row["stage"] for row in rows])
        ax.invert_yaxis()
        ax.set_xlabel("ms per sampling step", fontsize=LABEL_SIZE)
        ax.set_title(f"{setting_label(result)}\nof FLOPs ideal {result['efficiency']:.2f}, "
                     f"stage ceiling {result['stage_ceiling']:.2f}", fontsize=TITLE_SIZE - 1)
        _style(ax)
    axes[0][0].legend(fontsize=LABEL_SIZE - 2, loc="lower right")
    return fig

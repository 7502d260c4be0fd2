"""The λ trade-off across training seeds (notebook 06): sweep rows of ``data/results.csv``
summarised per grid point, and the recipe targets of issue 15 checked against the parent.

A claim about a fine-tuning recipe is a claim about its spread over training seeds, so every
summary carries the median, the range (min-max over seeds) and the seed count, never one run.

    rows = sweep_rows(read_results(RESULTS_CSV), "DyDiT-lab-L λ sweep")
    summary = seed_summary(rows, by="target_ratio")
    verdict = recipe_targets(rows[rows.target_ratio == 0.5], parent_fd=21.3)
"""

from __future__ import annotations

import pandas as pd

METRICS = ("fd_lenet", "accuracy", "gflops_per_image", "block_flops_fraction")
INTERVALS = ("fd_lenet", "accuracy")  # metrics whose rows carry a 95 % bootstrap interval (_lo, _hi)

# Issue 15's bar for a recipe that works on every seed (relative to the parent's FD-LeNet).
MEDIAN_FD_MARGIN, WORST_FD_MARGIN, FRACTION_TOLERANCE = 0.05, 0.15, 0.03


def sweep_rows(rows: list[dict] | pd.DataFrame, sweep: str, where: dict | None = None) -> pd.DataFrame:
    """The rows one sweep wrote (its ``sweep`` column), with the metric columns numeric;
    ``where`` keeps those whose grid columns hold the given values (e.g. ``{"lr": 3e-05}``)."""
    table = pd.DataFrame(rows)
    if "sweep" not in table.columns or not (table["sweep"] == sweep).any():
        known = sorted(set(table.get("sweep", pd.Series(dtype=str)).dropna()) - {""})
        raise ValueError(f"no rows of sweep {sweep!r} in the results; sweeps present: {known}")
    table = table[table["sweep"] == sweep].copy()
    for column, value in (where or {}).items():
        if column not in table.columns:
            raise ValueError(f"sweep {sweep!r} has no column {column!r} to select on")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        held = pd.to_numeric(table[column], errors="coerce") if numeric else table[column].astype(str)
        table = table[held == (value if numeric else str(value))]
    bounds = [f"{m}_{end}" for m in INTERVALS for end in ("lo", "hi")]
    numeric = [c for c in (*METRICS, "target_ratio", "train_seed", *bounds) if c in table]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table.reset_index(drop=True)


def seed_summary(rows: pd.DataFrame, by: str | list[str] = "target_ratio") -> pd.DataFrame:
    """Per grid point (``by``): the number of runs (and the devices they ran on, where rows
    have a ``device`` column) and each metric's median, min and max over them, and (where rows
    carry them) the 95 % interval of the median run: ``fd_lenet_lo``/``_hi``, ``accuracy_lo``/``_hi``,
    NaN where the median falls between two runs (an even count)."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in rows.columns]
    if missing:
        raise ValueError(f"rows have no column(s) {missing} to group by")
    metrics = [m for m in METRICS if m in rows.columns]
    groups = rows.groupby(by, sort=True)
    grouped = groups[metrics]
    summary = pd.concat({"median": grouped.median(), "min": grouped.min(), "max": grouped.max()}, axis=1)
    summary.columns = [f"{metric}_{stat}" for stat, metric in summary.columns]
    summary.insert(0, "runs", grouped.size())
    if "device" in rows.columns:  # where the runs trained: GPU and CPU runs of one recipe differ in rounding only
        summary.insert(1, "devices", groups["device"].agg(_device_counts))
    for metric in INTERVALS:
        if {metric, f"{metric}_lo", f"{metric}_hi"} <= set(rows.columns):
            columns = [f"{metric}_lo", f"{metric}_hi"]
            bounds = [_median_run_interval(part, metric) for _, part in groups]  # groups in summary order
            summary[columns] = pd.DataFrame(bounds, index=summary.index, columns=columns)
    return summary.reset_index()


def _median_run_interval(part: pd.DataFrame, metric: str) -> tuple[float, float]:
    """The (lo, hi) interval of the run whose ``metric`` is the median of ``part`` (NaNs if none is)."""
    values = pd.to_numeric(part[metric], errors="coerce")
    at = part[values == values.dropna().median()]
    if at.empty:
        return float("nan"), float("nan")
    return tuple(float(pd.to_numeric(at[f"{metric}_{end}"], errors="coerce").iloc[0]) for end in ("lo", "hi"))


def _device_counts(devices: pd.Series) -> str:
    """``"cpu 1, cuda 2"``: how many runs of a grid point ran on each device."""
    counts = devices.fillna("").replace("", "unknown").value_counts().sort_index()
    return ", ".join(f"{device} {n}" for device, n in counts.items())


def recipe_targets(rows: pd.DataFrame, parent_fd: float, target_ratio: float | None = None) -> dict:
    """Whether the runs of one recipe meet issue 15's bar: median FD within 5 % of the parent,
    worst within 15 %, every achieved block FLOPs fraction within 0.03 of λ. Returns the
    measured values next to each verdict (and the run with the median FD, the one to commit)."""
    if rows.empty:
        raise ValueError("no runs to check")
    if parent_fd <= 0:
        raise ValueError(f"parent_fd must be positive, got {parent_fd}")
    target = target_ratio if target_ratio is not None else float(rows["target_ratio"].iloc[0])
    fd = rows["fd_lenet"].astype(float)
    deviation = (rows["block_flops_fraction"].astype(float) - target).abs()
    median_run = rows.iloc[(fd - fd.median()).abs().argsort().iloc[0]]
    return {
        "runs": len(rows),
        "median_fd": float(fd.median()), "median_fd_ok": bool(fd.median() <= parent_fd * (1 + MEDIAN_FD_MARGIN)),
        "worst_fd": float(fd.max()), "worst_fd_ok": bool(fd.max() <= parent_fd * (1 + WORST_FD_MARGIN)),
        "worst_fraction_gap": float(deviation.max()), "fractions_ok": bool((deviation <= FRACTION_TOLERANCE).all()),
        "median_run": median_run["name"],
    }


# A control sweep's own grid column (besides the training seed): one chart point per value.
CONTROL_GRID_KEYS = ("routers", "lr")


def _varies(rows: pd.DataFrame, key: str) -> bool:
    """Whether a control sweep's rows name ``key`` as their grid column: any value for the
    router kind (one kind is still "TDW only"), two or more distinct values for the lr."""
    if key not in rows:
        return False
    values = rows[key].astype(str)
    values = values[values != ""]
    return len(values) > 0 and (key == "routers" or values.nunique() > 1)


def control_summaries(controls: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Each control sweep (name -> :func:`sweep_rows`) summarised over its training seeds, one
    summary per value of the grid column it varies (``routers``: "TDW only"; ``lr``: the name
    up to its last ", " then "lr 1e-05"), else one for the whole sweep. A column that exists
    only because other sweeps' rows have it (empty here) does not count, nor an ``lr`` that every
    row of the sweep shares (sweeps record their lr even when they do not vary it)."""
    summaries = {}
    for name, rows in controls.items():
        key = next((k for k in CONTROL_GRID_KEYS if _varies(rows, k)), None)
        groups = rows.groupby(key) if key else [(None, rows)]
        for value, part in groups:
            if key is None:
                label = name
            elif key == "routers":
                label = f"{str(value).upper()} only"
            else:
                label = f"{name.rsplit(', ', 1)[0]}, {key} {value}"  # "X, lr sweep" -> "X, lr 1e-05"
            summaries[label] = seed_summary(part.assign(target_ratio=0), by="target_ratio")
    return summaries


# FlexiDiT's fine-tuning recipes (issue 15, item 4): label -> (sweep name, grid selection). Each
# becomes one curve over the number of coarse sampling steps k.
FLEXIDIT_RECIPES = {
    "every weight (lr 1e-4)": ("FlexiDiT-lab-L", None),
    "shared weights at lr 3e-5": ("FlexiDiT-lab-L, shared weights at a lower lr", {"lr": 3e-05}),
    "shared weights at lr 1e-5": ("FlexiDiT-lab-L, shared weights at a lower lr", {"lr": 1e-05}),
    "transformer frozen": ("FlexiDiT-lab-L, transformer frozen", None),
    "frozen + adapters, rank 8": ("FlexiDiT-lab-L, coarse-only adapters", {"lora_rank": 8}),
    "frozen + adapters, rank 32": ("FlexiDiT-lab-L, coarse-only adapters", {"lora_rank": 32}),
    "frozen + adapters, rank 64": ("FlexiDiT-lab-L, coarse-only adapters", {"lora_rank": 64}),
}


def recipe_curves(rows: list[dict] | pd.DataFrame, recipes: dict | None = None,
                  by: str = "coarse_steps") -> dict[str, pd.DataFrame]:
    """Each recipe (label -> (sweep, where), default :data:`FLEXIDIT_RECIPES`) summarised over
    its training seeds at every value of ``by``; a recipe with no rows yet is left out."""
    curves = {}
    for label, (sweep, where) in (FLEXIDIT_RECIPES if recipes is None else recipes).items():
        try:
            picked = sweep_rows(rows, sweep, where)
        except ValueError:  # the sweep has not written rows
            continue
        if not picked.empty:
            picked[by] = pd.to_numeric(picked[by], errors="coerce")
            curves[label] = seed_summary(picked, by=by)
    if not curves:
        raise ValueError("none of the recipes has rows in the results")
    return curves

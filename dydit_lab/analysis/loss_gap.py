"""Figure 1(a) of DyDiT: the noise-prediction loss of a small and a large DiT at every timestep,
and their gap. DyDiT argues the gap is small at noisy timesteps, so a narrower model suffices
there (timestep-wise dynamic width). Samples are paired (same x0, t and noise for every model),
so the gap gets tight confidence intervals.

Two kinds of spread are kept apart: the *evaluation-noise* interval (which images and noise
were drawn; :func:`loss_gap`) and the *between-seed* range (which training run of each size
was measured; :func:`per_run_loss`, :func:`seed_gap`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checkpoints import load_model
from ..diffusion import NUM_TIMESTEPS
from .common import _SEED_STRIDE, _as_batch, _as_timesteps, _diffusion_for, _evaluating, _t_critical


# ---------------------------------------------------------------------------
# Figure 1(a): loss per timestep
# ---------------------------------------------------------------------------


def timestep_noise(t: int, n: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The noise of samples 0..n-1 at timestep ``t`` in :func:`per_timestep_loss`: (n, *shape).

    One generator per timestep, so the noise of a timestep does not depend on the batch
    size or on which other timesteps are evaluated.
    """
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + int(t))
    return torch.randn((n, *shape), generator=gen)


def sample_image_indices(num_timesteps: int, samples_per_t: int, num_images: int) -> np.ndarray:
    """Image index of each (timestep position, sample) in :func:`per_timestep_loss`: (T, S).

    Pairs are numbered row-major and cycle through the images, so every image is used
    about equally often and neighbouring timesteps see different images (as long as there
    are enough images), which keeps neighbouring per-timestep estimates independent.
    """
    flat = np.arange(num_timesteps * samples_per_t)
    return (flat % num_images).reshape(num_timesteps, samples_per_t)


def per_timestep_loss(models: Mapping[str, nn.Module], images, labels,
                      timesteps: Iterable[int] = range(NUM_TIMESTEPS), samples_per_t: int = 16,
                      batch_size: int = 256, seed: int = 0, device="cpu",
                      progress: bool = True) -> pd.DataFrame:
    """Noise-prediction MSE of each model at each timestep (DyDiT Figure 1(a)).

    Sample ``s`` at timestep ``t`` uses image ``sample_image_indices(...)[i, s]`` (``i`` the
    position of ``t``) and noise ``timestep_noise(t, samples_per_t, ...)[s]``; all models see
    exactly the same x_t, so their losses can be compared pair by pair. (t, sample) pairs
    are flattened and evaluated ``batch_size`` at a time, so few timesteps per batch are
    needed. Models are put in eval mode (no label dropout) and restored afterwards; they
    must already be on ``device``.

    Returns a long DataFrame with columns ``model, t, sample, mse`` (one row per model,
    timestep and sample; ``mse`` is the mean over pixels of (eps - eps_hat)^2).
    """
    images, labels = _as_batch(images, labels)
    ts = _as_timesteps(timesteps)
    if not models:
        raise ValueError("need at least one model")
    if samples_per_t < 1 or batch_size < 1:
        raise ValueError("samples_per_t and batch_size must be positive")
    names = list(models)
    diffusions = {name: _diffusion_for(m) for name, m in models.items()}
    S, T = int(samples_per_t), len(ts)
    image_idx = torch.from_numpy(sample_image_indices(T, S, len(images)).reshape(-1))
    mse = np.empty((len(names), T * S))
    # Whole timesteps per block so each timestep's noise is drawn once.
    t_per_block = max(1, batch_size // S)
    bar = tqdm(total=T * S, desc="loss per timestep", disable=not progress, leave=False)
    with torch.no_grad(), _evaluating(models.values()), bar:
        for b0 in range(0, T, t_per_block):
            block = ts[b0:b0 + t_per_block]
            noise = torch.cat([timestep_noise(t, S, images.shape[1:], seed) for t in block])
            t_flat = torch.tensor(block).repeat_interleave(S)
            for lo in range(0, len(noise), batch_size):
                hi = min(lo + batch_size, len(noise))
                pos = slice(b0 * S + lo, b0 * S + hi)  # positions in the flat (t, sample) order
                idx = image_idx[pos]
                x0, y = images[idx].to(device), labels[idx].to(device)
                t, eps = t_flat[lo:hi].to(device), noise[lo:hi].to(device)
                for i, name in enumerate(names):
                    err = diffusions[name].eps_squared_error(models[name], x0, t, y, eps)
                    mse[i, pos] = err.mean(dim=(1, 2, 3)).double().cpu().numpy()
                bar.update(hi - lo)
    return pd.DataFrame({
        "model": np.repeat(np.array(names, dtype=object), T * S),
        "t": np.tile(np.repeat(np.asarray(ts, dtype=np.int64), S), len(names)),
        "sample": np.tile(np.arange(S, dtype=np.int64), len(names) * T),
        "mse": mse.reshape(-1),
    })


def _paired_stats(df: pd.DataFrame, small: str, large: str) -> pd.DataFrame:
    """Per timestep: mean losses, mean and standard error of the paired difference, n."""
    known = set(df["model"].unique())
    for name in (small, large):
        if name not in known:
            raise ValueError(f"model {name!r} not in the DataFrame (have {sorted(known)})")
    if small == large:
        raise ValueError("small and large must be different models")
    sub = df[df["model"].isin([small, large])]
    wide = sub.pivot(index=["t", "sample"], columns="model", values="mse")
    paired = wide.dropna()
    if len(paired) < len(wide):
        missing = len(wide) - len(paired)
        warnings.warn(f"{missing} (t, sample) pairs lack one of the models; dropped")
    diff = (paired[small] - paired[large]).rename("diff")
    grouped = pd.concat([paired[[small, large]], diff], axis=1).groupby(level="t")
    stats = pd.DataFrame({
        "small": grouped[small].mean(),
        "large": grouped[large].mean(),
        "gap": grouped["diff"].mean(),
        # Paired by sample: the spread of the differences, not of each model's loss.
        "gap_se": grouped["diff"].std(ddof=1) / np.sqrt(grouped["diff"].count()),
        "n": grouped["diff"].count(),
    })
    return stats.sort_index()


def loss_gap(df: pd.DataFrame, small: str, large: str, smooth: int = 1,
             confidence: float = 0.95) -> pd.DataFrame:
    """Loss gap small - large per timestep with a confidence band (Figure 1(a), bottom).

    The band is a ``confidence`` (95 %) Student-t interval of the mean paired difference at
    each t (pairs: same image and noise, see :func:`per_timestep_loss`); identical models
    give a zero gap and a zero-width band; a single sample per t gives a NaN band.

    ``smooth > 1`` replaces every column by its centered rolling mean over ``smooth``
    neighbouring *evaluated* timesteps (fewer at the ends). The band is then that of the
    smoothed curve: standard errors combine as independent estimates (neighbouring
    timesteps use different noise and images) with the summed degrees of freedom. It is
    narrower than the per-t band and describes the local average, not single timesteps.

    Returns columns ``t, small, large, gap, gap_lo, gap_hi, relative_gap`` (gap / large)
    plus ``gap_se`` and ``n`` (samples per t); ``attrs`` hold the names and settings.
    """
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    stats = _paired_stats(df, small, large)
    dof = (stats["n"] - 1).astype(float)
    se = stats["gap_se"]
    if smooth > 1:
        roll = lambda s: s.rolling(smooth, center=True, min_periods=1)  # noqa: E731
        count = roll(pd.Series(1.0, index=stats.index)).sum()
        se = np.sqrt(roll(se**2).sum()) / count
        dof = roll(dof).sum()
        stats = stats.assign(small=roll(stats["small"]).mean(), large=roll(stats["large"]).mean(),
                             gap=roll(stats["gap"]).mean())
    half = _t_critical(confidence, dof) * se.to_numpy()
    out = pd.DataFrame({
        "t": stats.index.to_numpy(),
        "small": stats["small"].to_numpy(),
        "large": stats["large"].to_numpy(),
        "gap": stats["gap"].to_numpy(),
        "gap_lo": stats["gap"].to_numpy() - half,
        "gap_hi": stats["gap"].to_numpy() + half,
        "relative_gap": (stats["gap"] / stats["large"]).to_numpy(),
        "gap_se": se.to_numpy(),
        "n": stats["n"].to_numpy(),
    })
    out.attrs.update(small=small, large=large, smooth=int(smooth), confidence=confidence)
    return out


def summarize_gap(gap_df: pd.DataFrame, bins: int = 4, num_timesteps: int = NUM_TIMESTEPS
                  ) -> pd.DataFrame:
    """Mean losses and gap per equal range of timesteps (quarters of [0, 1000) by default).

    Columns: ``t_range`` ("0-249", ...), ``t_start``, ``t_end`` (exclusive), ``n_timesteps``,
    ``small``, ``large``, ``gap`` (means over the evaluated timesteps in the range),
    ``relative_gap`` (gap / large of those means: a ratio of means, robust to tiny losses),
    ``gap_lo``/``gap_hi`` (confidence interval of the range's mean gap, combining the
    per-t standard errors as independent) and ``frac_t_significant`` (share of timesteps
    whose own band lies above zero). A gap that "vanishes" at noisy timesteps shows as a
    band around zero and a small relative gap in the last ranges.

    The band needs an unsmoothed ``gap_df`` (smoothed neighbours are correlated); for a
    smoothed one it is NaN, with a warning.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    edges = np.linspace(0, num_timesteps, bins + 1).round().astype(int)
    labels = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    smoothed = gap_df.attrs.get("smooth", 1) > 1
    if smoothed:
        warnings.warn("summarize_gap: gap_df is smoothed; pass loss_gap(..., smooth=1) for a band")
    confidence = gap_df.attrs.get("confidence", 0.95)
    rows = []
    for label, a, b in zip(labels, edges[:-1], edges[1:]):
        part = gap_df[(gap_df["t"] >= a) & (gap_df["t"] < b)]
        m = len(part)
        gap = part["gap"].mean() if m else np.nan
        se = np.sqrt((part["gap_se"] ** 2).sum()) / m if m else np.nan
        half = np.nan if smoothed else float(_t_critical(confidence, (part["n"] - 1).sum()) * se)
        rows.append({
            "t_range": label, "t_start": int(a), "t_end": int(b), "n_timesteps": m,
            "small": part["small"].mean() if m else np.nan,
            "large": part["large"].mean() if m else np.nan,
            "gap": gap,
            "relative_gap": gap / part["large"].mean() if m else np.nan,
            "gap_lo": gap - half, "gap_hi": gap + half,
            "frac_t_significant": (part["gap_lo"] > 0).mean() if m else np.nan,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Several training runs (seeds) per model size
# ---------------------------------------------------------------------------


def per_run_loss(checkpoints: Mapping[str, Sequence], images, labels,
                 timesteps: Iterable[int] = range(NUM_TIMESTEPS), samples_per_t: int = 16,
                 batch_size: int = 256, seed: int = 0, device="cpu",
                 progress: bool = True) -> pd.DataFrame:
    """:func:`per_timestep_loss` of several training runs (one per training seed) of each size.

    ``checkpoints`` maps a size name to its runs, e.g. ``{"DiT-lab-S": [s0, s1], "DiT-lab-L":
    [l0, l1]}``; a run is a checkpoint path (read with :func:`~dydit_lab.load_model` onto
    ``device``) or a model already on ``device``. One list may hold a single run. Every run
    of every size is evaluated in one pass on the same images, timesteps and noise, so any
    two runs pair sample by sample.

    Returns the columns of :func:`per_timestep_loss` plus ``run`` (position of the run in its
    size's list): ``model`` (the size name), ``run``, ``t``, ``sample``, ``mse``;
    ``attrs["runs"]`` names each size's runs (file stem, or ``run <i>`` for a model).
    """
    if not checkpoints:
        raise ValueError("need at least one model size")
    keys, models, runs = [], {}, {}
    for size, entries in checkpoints.items():
        entries = list(entries)
        if not entries:
            raise ValueError(f"no checkpoints for {size!r}")
        runs[size] = []
        for i, entry in enumerate(entries):
            key = str(len(keys))  # internal name: sizes or runs may share file names
            keys.append((size, i))
            models[key] = entry if isinstance(entry, nn.Module) else load_model(entry, device=device)
            runs[size].append(f"run {i}" if isinstance(entry, nn.Module) else Path(entry).stem)
    df = per_timestep_loss(models, images, labels, timesteps=timesteps, samples_per_t=samples_per_t,
                           batch_size=batch_size, seed=seed, device=device, progress=progress)
    which = df["model"].astype(int)
    out = pd.DataFrame({
        "model": np.array([keys[k][0] for k in which], dtype=object),
        "run": np.array([keys[k][1] for k in which], dtype=np.int64),
        "t": df["t"], "sample": df["sample"], "mse": df["mse"],
    })
    out.attrs["runs"] = runs
    return out


def _with_runs(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``run`` column (all 0 for the output of :func:`per_timestep_loss`)."""
    return df if "run" in df.columns else df.assign(run=0)


def pair_gaps(df: pd.DataFrame, small: str, large: str, smooth: int = 1,
              confidence: float = 0.95) -> pd.DataFrame:
    """:func:`loss_gap` of every pair (run i of ``small``, run j of ``large``), stacked.

    ``df``: the output of :func:`per_run_loss` (or of :func:`per_timestep_loss`: one run each).
    Returns :func:`loss_gap`'s columns plus ``small_run`` and ``large_run``; one row per pair
    and timestep.
    """
    df = _with_runs(df)
    frames = []
    for i in sorted(df.loc[df["model"] == small, "run"].unique()):
        for j in sorted(df.loc[df["model"] == large, "run"].unique()):
            pick = (((df["model"] == small) & (df["run"] == i))
                    | ((df["model"] == large) & (df["run"] == j)))
            gap = loss_gap(df[pick].drop(columns="run"), small, large, smooth, confidence)
            frames.append(gap.assign(small_run=int(i), large_run=int(j)))
    if not frames:  # a name that is not in df: let loss_gap say which
        loss_gap(df.drop(columns="run"), small, large, smooth, confidence)
    return pd.concat(frames, ignore_index=True)


def seed_gap(df: pd.DataFrame, small: str, large: str, smooth: int = 1,
             confidence: float = 0.95) -> pd.DataFrame:
    """The gap of the run-averaged models with its evaluation-noise interval and between-seed range.

    Each sample's loss is first averaged over the runs of each size; :func:`loss_gap` of those
    averages gives ``gap`` and its ``confidence`` interval ``gap_lo``/``gap_hi``, which
    measures only the evaluation noise (images and noise drawn), as before.

    The between-seed band is the **min–max over all pairs of small × large runs** (2 x 2
    runs: 4 pairs) of each pair's own gap at each t (``seed_lo``/``seed_hi``) and relative
    gap (``relative_seed_lo``/``relative_seed_hi``), each smoothed like ``gap``. It is a range,
    not a confidence interval: with two runs per size it shows how far the gap moves when
    either model is retrained, nothing more. With one run per size there is no band: those
    columns are NaN and ``attrs["pairs"] == 1``.

    Returns :func:`loss_gap`'s columns plus the four band columns; ``attrs`` add ``pairs``
    and ``runs`` (runs per size). With one run per size ``gap`` equals :func:`loss_gap`'s.
    """
    df = _with_runs(df)
    mean = (df[df["model"].isin([small, large])]
            .groupby(["model", "t", "sample"], as_index=False)["mse"].mean())
    out = loss_gap(mean, small, large, smooth=smooth, confidence=confidence)
    pairs = pair_gaps(df, small, large, smooth=smooth, confidence=confidence)
    n_pairs = len(pairs[["small_run", "large_run"]].drop_duplicates())
    band = pairs.groupby("t")[["gap", "relative_gap"]].agg(["min", "max"]).loc[out["t"]]
    for column, source, stat in (("seed_lo", "gap", "min"), ("seed_hi", "gap", "max"),
                                 ("relative_seed_lo", "relative_gap", "min"),
                                 ("relative_seed_hi", "relative_gap", "max")):
        out[column] = band[(source, stat)].to_numpy() if n_pairs > 1 else np.nan
    out.attrs.update(pairs=n_pairs, runs={name: int(df.loc[df["model"] == name, "run"].nunique())
                                         for name in (small, large)})
    return out


def summarize_seed_gap(df: pd.DataFrame, small: str, large: str, bins: int = 4,
                       confidence: float = 0.95, num_timesteps: int = NUM_TIMESTEPS) -> pd.DataFrame:
    """:func:`summarize_gap` of the run-averaged gap, plus the between-seed range per range of t.

    ``df``: the output of :func:`per_run_loss`. Adds ``seed_lo``/``seed_hi`` and
    ``relative_seed_lo``/``relative_seed_hi``: the min–max over all small × large pairs of
    runs of each pair's mean gap (relative gap) in the range, and ``pairs``; the band columns
    are NaN with one run per size.
    """
    summary = summarize_gap(seed_gap(df, small, large, confidence=confidence), bins, num_timesteps)
    per_pair = [summarize_gap(gap, bins, num_timesteps)[["gap", "relative_gap"]].to_numpy()
                for _, gap in pair_gaps(df, small, large, confidence=confidence)
                .groupby(["small_run", "large_run"])]
    stacked = np.stack(per_pair)  # (pairs, bins, 2)
    several = len(per_pair) > 1
    for k, column in enumerate(("seed", "relative_seed")):
        summary[f"{column}_lo"] = stacked[:, :, k].min(axis=0) if several else np.nan
        summary[f"{column}_hi"] = stacked[:, :, k].max(axis=0) if several else np.nan
    summary["pairs"] = len(per_pair)
    return summary

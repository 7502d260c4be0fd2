"""Figure 1(a) of DyDiT: the noise-prediction loss of a small and a large DiT at every timestep,
and their gap. DyDiT argues the gap is small at noisy timesteps, so a narrower model suffices
there (timestep-wise dynamic width). Samples are paired (same x0, t and noise for every model),
so the gap gets tight confidence intervals.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

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

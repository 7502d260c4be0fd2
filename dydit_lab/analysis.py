"""Loss analyses behind DyDiT's motivation (Figure 1 of the paper).

* Figure 1(a): the noise-prediction loss of a small and a large DiT at every timestep, and
  their gap. DyDiT argues the gap is small at noisy timesteps, so a narrower model suffices
  there (timestep-wise dynamic width). :func:`per_timestep_loss`, :func:`loss_gap` and
  :func:`summarize_gap` measure this with paired samples and confidence intervals.
* Figure 1(b): where in the image the loss sits. DyDiT argues it concentrates on object
  patches, so background tokens can skip computation (spatial-wise dynamic tokens).
  :func:`patch_loss_maps`, :func:`normalize_maps` and :func:`stroke_concentration` measure it.

Noise always comes from seeded CPU generators, so every model sees the same x_t and the
results do not depend on the device, the batch size or which other timesteps are evaluated.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .diffusion import NUM_TIMESTEPS, GaussianDiffusion

__all__ = [
    "PatchLossMaps",
    "RoutingTrace",
    "trace_sampling",
    "image_noise",
    "loss_gap",
    "noisy_images",
    "normalize_maps",
    "patch_loss_maps",
    "patch_mean",
    "per_timestep_loss",
    "sample_image_indices",
    "stroke_concentration",
    "summarize_gap",
    "timestep_noise",
]

# Seeds of the per-timestep generators are seed * _SEED_STRIDE + t: distinct for t < stride.
_SEED_STRIDE = 1_000_003


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _as_batch(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert (images, labels) to float (N, C, H, W) and long (N,) CPU tensors."""
    images = torch.as_tensor(images).float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("need at least one image")
    return images, labels


def _as_timesteps(timesteps: Iterable[int]) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("need at least one timestep")
    bad = [t for t in ts if not 0 <= t < NUM_TIMESTEPS]
    if bad:
        raise ValueError(f"timesteps must lie in [0, {NUM_TIMESTEPS}), got {bad[:5]}")
    return ts


def _diffusion_for(model: nn.Module) -> GaussianDiffusion:
    # learn_sigma decides how many output channels are eps; plain modules are eps-only.
    learn_sigma = bool(getattr(getattr(model, "config", None), "learn_sigma", False))
    return GaussianDiffusion(learn_sigma=learn_sigma)


@contextmanager
def _evaluating(models: Iterable[nn.Module]):
    """Eval mode for the duration (label dropout off), then restore each model's mode."""
    models = list(models)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _t_critical(confidence: float, dof) -> np.ndarray:
    """Two-sided Student-t critical value; NaN where there are no degrees of freedom."""
    from scipy import stats  # scipy ships with mlxtend, a dependency

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    dof = np.asarray(dof, dtype=float)
    safe = np.where(dof > 0, dof, 1.0)
    return np.where(dof > 0, stats.t.ppf(0.5 + confidence / 2, safe), np.nan)


def patch_mean(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean of ``x`` (N, C, H, W) over channels and non-overlapping patches: (N, H/p, W/p)."""
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[-2] % patch_size or x.shape[-1] % patch_size:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by patch {patch_size}")
    return F.avg_pool2d(x.float().mean(dim=1, keepdim=True), patch_size).squeeze(1)


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
# Figure 1(b): where the loss sits
# ---------------------------------------------------------------------------


@dataclass
class PatchLossMaps:
    """Result of :func:`patch_loss_maps`.

    ``maps``: (N, T, H/p, W/p) per-patch mean squared eps error; ``x_t``: (N, T, C, H, W)
    the noisy inputs the model saw; ``noise``: (N, C, H, W), shared by all timesteps of an
    image; ``timesteps``: the T timesteps; ``patch_size``: p.
    """

    maps: torch.Tensor
    x_t: torch.Tensor
    noise: torch.Tensor
    timesteps: list[int]
    patch_size: int


def image_noise(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The noise of :func:`patch_loss_maps` and :func:`noisy_images`: one draw per image."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def noisy_images(images, timesteps: Iterable[int], seed: int = 0) -> torch.Tensor:
    """x_t of every image at every timestep, same noise per image: (N, T, C, H, W)."""
    images = torch.as_tensor(images).float().cpu()
    ts = _as_timesteps(timesteps)
    noise = image_noise(images.shape, seed)
    diffusion = GaussianDiffusion()
    return torch.stack(
        [diffusion.q_sample(images, torch.full((len(images),), t), noise) for t in ts], dim=1
    )


def patch_loss_maps(model: nn.Module, images, labels, timesteps: Iterable[int], seed: int = 0,
                    batch_size: int = 256, device="cpu") -> PatchLossMaps:
    """Per-patch noise-prediction error of ``model`` (DyDiT Figure 1(b)).

    Each image gets one noise draw (:func:`image_noise`) used at all ``timesteps``, so the
    maps of an image differ only by t. The patch is the model's ``patch_size`` (its tokens).
    The returned :class:`PatchLossMaps` carries the x_t for display beside the maps.
    """
    images, labels = _as_batch(images, labels)
    ts = _as_timesteps(timesteps)
    p = int(model.patch_size)
    diffusion = _diffusion_for(model)
    noise = image_noise(images.shape, seed)
    N, T = len(images), len(ts)
    # (image, t) pairs, image-major, so maps reshape to (N, T, ...).
    img_idx = torch.arange(N).repeat_interleave(T)
    t_all = torch.tensor(ts).repeat(N)
    chunks = []
    with torch.no_grad(), _evaluating([model]):
        for lo in range(0, N * T, batch_size):
            idx, t = img_idx[lo:lo + batch_size], t_all[lo:lo + batch_size]
            err = diffusion.eps_squared_error(model, images[idx].to(device), t.to(device),
                                              labels[idx].to(device), noise[idx].to(device))
            chunks.append(patch_mean(err, p).cpu())
    maps = torch.cat(chunks).reshape(N, T, *chunks[0].shape[-2:])
    return PatchLossMaps(maps=maps, x_t=noisy_images(images, ts, seed), noise=noise,
                         timesteps=ts, patch_size=p)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale every map (last two dims) to [0, 1]; a constant map becomes zeros.

    Per map, so maps at different t are comparable in shape, not in level.
    """
    maps = torch.as_tensor(maps).float()
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))  # avoid 0/0 for constant maps
    return torch.where(span > 0, (maps - lo) / safe, torch.zeros_like(maps))


def stroke_concentration(maps, images, patch_size: int | None = None, threshold: float = -0.8,
                         timesteps: Sequence[int] | None = None) -> pd.DataFrame:
    """Share of the loss that falls on digit ("stroke") patches, per timestep.

    A patch is stroke when its clean-image mean intensity exceeds ``threshold`` (images in
    [-1, 1], background -1; the default -0.8 means about 10 % ink). ``maps`` is the (N, T,
    h, w) tensor of *raw* maps or a :class:`PatchLossMaps` (then timesteps and patch size
    come from it); normalised maps would change the shares (their minimum is subtracted).

    Columns: ``t``, ``stroke_area_share`` (fraction of patches that are stroke),
    ``stroke_loss_share`` (fraction of the summed loss on them), both averaged over images,
    and ``ratio`` = loss share / area share of those means (1: no concentration).
    """
    if isinstance(maps, PatchLossMaps):
        timesteps = maps.timesteps if timesteps is None else timesteps
        patch_size = maps.patch_size if patch_size is None else patch_size
        maps = maps.maps
    if patch_size is None:
        raise ValueError("patch_size is required when maps is a tensor")
    maps = torch.as_tensor(maps).double()
    stroke = patch_mean(torch.as_tensor(images), patch_size) > threshold  # (N, h, w)
    if maps.ndim != 4 or maps.shape[0] != stroke.shape[0] or maps.shape[2:] != stroke.shape[1:]:
        raise ValueError(f"maps {tuple(maps.shape)} do not match (N, T, h, w) = "
                         f"({stroke.shape[0]}, T, {stroke.shape[1]}, {stroke.shape[2]})")
    if (maps < 0).any():
        raise ValueError("maps must be non-negative losses")
    timesteps = list(range(maps.shape[1])) if timesteps is None else [int(t) for t in timesteps]
    area = stroke.double().mean(dim=(-2, -1))  # (N,)
    total = maps.sum(dim=(-2, -1))  # (N, T)
    on_stroke = (maps * stroke[:, None]).sum(dim=(-2, -1))
    # An all-zero map has no share to give: NaN, ignored in the mean over images.
    share = torch.where(total > 0, on_stroke / torch.where(total > 0, total, 1.0),
                        torch.full_like(total, float("nan")))
    area_share = float(area.mean())
    loss_share = np.nanmean(share.numpy(), axis=0)
    return pd.DataFrame({
        "t": timesteps,
        "stroke_area_share": area_share,
        "stroke_loss_share": loss_share,
        "ratio": loss_share / area_share if area_share > 0 else np.nan,
    })


# ---------------------------------------------------------------------------
# Router schedules of a DyDiT sampling run
# ---------------------------------------------------------------------------


@dataclass
class RoutingTrace:
    """What a DyDiT did over one sampling run (steps in sampling order: noisy first).

    ``heads``/``groups``: (S, B, depth, H) 0/1; ``tokens``: (S, B, depth, N) 0/1;
    ``x_t``: (S, B, C, H, W) the model inputs; ``flops_fraction``: (S,) mean over samples
    of the whole-model FLOPs fraction; ``samples``: the final images.
    """

    name: str
    timesteps: list[int]
    labels: torch.Tensor
    x_t: torch.Tensor
    heads: torch.Tensor
    groups: torch.Tensor
    tokens: torch.Tensor
    flops_fraction: torch.Tensor
    samples: torch.Tensor
    patch_size: int

    @property
    def mean_flops_fraction(self) -> float:
        return float(self.flops_fraction.mean())

    def token_grid(self, step: int, sample: int, layer: int) -> torch.Tensor:
        """The SDT keep mask of one block as an (H/p, W/p) grid over the image."""
        keep = self.tokens[step, sample, layer]
        side = int(round(keep.numel() ** 0.5))
        return keep.reshape(side, side)


@torch.no_grad()
def trace_sampling(model, labels, steps: int = 50, method: str = "ddim", seed: int = 0,
                   device="cpu", progress: bool = True, name: str | None = None) -> RoutingTrace:
    """Sample digits ``labels`` with a DyDiT and record its routing at every step."""
    from .dydit import RoutingRecorder

    labels = torch.as_tensor(labels).long()
    recorder = RoutingRecorder(model.eval(), keep_inputs=True)
    cfg = model.config
    diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps)
    shape = (len(labels), model.in_channels, cfg.input_size, cfg.input_size)
    samples = diffusion.sample(recorder, labels.to(device), shape, method=method, seed=seed,
                               progress=progress).cpu()
    stack = lambda key: torch.stack([getattr(r, key) for r in recorder.records])  # noqa: E731
    fractions = torch.stack([r.flops_fraction(cfg).mean() for r in recorder.records])
    return RoutingTrace(
        name=name or (model.arch or "DyDiT"), timesteps=[int(r.t[0]) for r in recorder.records],
        labels=labels, x_t=torch.stack(recorder.inputs), heads=stack("heads"),
        groups=stack("groups"), tokens=stack("tokens"), flops_fraction=fractions,
        samples=samples, patch_size=model.patch_size)

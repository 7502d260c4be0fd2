"""Helpers shared by the loss analyses: input checks, seeded noise, patch means, intervals."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion import NUM_TIMESTEPS, GaussianDiffusion

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

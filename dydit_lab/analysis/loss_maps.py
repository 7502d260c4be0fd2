"""Figure 1(b) of DyDiT: where in the image the loss sits. DyDiT argues it concentrates on object
patches, so background tokens can skip computation (spatial-wise dynamic tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..diffusion import GaussianDiffusion
from .common import _as_batch, _as_timesteps, _diffusion_for, _evaluating, patch_mean


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

"""A user's Stable Diffusion VAE folder (``AutoencoderKL.save_pretrained`` layout, e.g.
``stabilityai/sd-vae-ft-ema`` downloaded by the user): load, check against a model, encode,
decode. diffusers is imported only here and only when a VAE is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

LATENT_SCALE = 0.18215  # DiT trains on VAE latents times this (its train.py and sample.py)
LATENT_CHANNELS = 4  # the released models' latent space (the SD VAE)
INSTALL_HINT = 'pip install -e ".[official]"'


def load_vae(folder: str | Path, device: str | torch.device = "cpu"):
    """``diffusers.AutoencoderKL.from_pretrained(folder)`` from a local folder only, in eval mode.

    A missing folder, a folder without ``config.json``, an unreadable one or a missing
    diffusers are each one ``ValueError`` (never a download attempt).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--vae {folder} is not a folder (give a local AutoencoderKL folder, "
                         f"e.g. one saved from stabilityai/sd-vae-ft-ema)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--vae {folder} holds no config.json: not a diffusers AutoencoderKL folder")
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ValueError(f"a VAE needs diffusers, an optional extra: {INSTALL_HINT}") from err
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"cannot load an AutoencoderKL from {folder}: {str(err).splitlines()[0]}") from err
    return vae.to(device).eval().requires_grad_(False)


def downsampling(vae) -> int:
    """Image pixels per latent pixel along a side (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_vae_fits(vae, model, folder: str | Path = "") -> None:
    """A ``ValueError`` when the VAE's latents are not what ``model`` takes (channels)."""
    latent, image = vae.config.latent_channels, vae.config.in_channels
    if latent != model.in_channels:
        raise ValueError(f"--vae {folder} makes {latent}-channel latents; the model takes {model.in_channels} channels")
    if image != 3:
        raise ValueError(f"--vae {folder} encodes {image}-channel images; RGB (3) is expected")


@torch.no_grad()
def encode(vae, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> latents as DiT trains on them: the posterior sample
    ``mean + std * noise`` (``noise`` ~ N(0, I) of the latents' shape; None: the mean) x 0.18215."""
    dist = vae.encode(images).latent_dist
    latents = dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean)
    return latents * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as DiT's) -> images, nominally in [-1, 1]."""
    return vae.decode(latents / LATENT_SCALE).sample

"""Files in the released formats, written here with random weights: a diffusers VAE folder, an
RGB image folder, and latent DiT / DyDiT checkpoints as raw state dicts (as released)."""

import numpy as np
import pytest
import torch
from PIL import Image

from .files import IMAGE_SIZE, NUM_CLASSES, latent_model


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL saved as diffusers does (config.json + safetensors)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=IMAGE_SIZE)
    path = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def rgb_folder(tmp_path_factory):
    """root/<class>/<image>: 3 classes, 3 RGB PNGs each, of different non-square sizes."""
    root = tmp_path_factory.mktemp("imagenet-tiny")
    rng = np.random.default_rng(0)
    sizes = [(40, 24), (16, 20), (33, 47)]
    for c in range(NUM_CLASSES):
        (root / f"n0{c}").mkdir()
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"n0{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def released(tmp_path_factory):
    """kind -> path of a raw state dict (the released files' layout: no args, no arch)."""
    root = tmp_path_factory.mktemp("released")
    paths = {}
    for kind in ("dit", "dydit-2025", "dydit-2024"):
        paths[kind] = root / f"{kind}.pt"
        torch.save(latent_model(kind).state_dict(), paths[kind])
    return paths

"""Encoding an image folder into VAE latents once (``python -m dydit_lab extract-latents``), so
that ``train`` / ``finetune`` / ``flexi-finetune --data DIR`` run on latents as the released
models were trained.

Each image is centre-cropped to ``image_size`` as DiT's data pipeline does (ADM's crop: halve
with a box filter while the short side is at least twice the size, bicubic to the size, cut the
centre), encoded, and a posterior sample times 0.18215 is kept. Under ``torchrun`` rank r
encodes images r, r + world, ... and writes its own shard; rank 0 then writes the manifest
(:data:`dydit_lab.data.LATENT_MANIFEST`) that marks the folder as latents. Image i's posterior
noise is seeded by (seed, i), so the latents do not depend on the number of ranks or the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import LATENT_MANIFEST, list_image_folder
from . import distributed
from .vae import LATENT_SCALE, downsampling, encode, load_vae

SHARD_DTYPE = torch.float16  # half the disk and host memory; DiT's latents are ~unit scale


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """``size`` x ``size`` RGB uint8 from the image's centre, resized as ADM / DiT do."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(v // 2 for v in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(v * scale) for v in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def read_images(paths, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]; an unreadable file is a ``ValueError`` naming it."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arr = center_crop(image, size)
        except OSError as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0))
    return torch.stack(out)


def extract_latents(images: str | Path, vae: str | Path, out: str | Path, image_size: int = 256,
                    batch_size: int = 32, device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    """Encode ``images`` (one sub-folder per class) into a latent folder ``out``; returns its
    manifest. Refuses an ``out`` that already holds latents."""
    out = Path(out)
    if (out / LATENT_MANIFEST).exists():
        raise FileExistsError(f"{out} already holds latents ({LATENT_MANIFEST}): pick another --out")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"--image-size and --batch-size must be positive, got {image_size} and {batch_size}")
    classes, items = list_image_folder(images)
    rank, world, device = distributed.start(device)
    autoencoder = load_vae(vae, device)
    if autoencoder.config.in_channels != 3:
        raise ValueError(f"--vae {vae} encodes {autoencoder.config.in_channels}-channel images; RGB (3) is expected")
    factor = downsampling(autoencoder)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's downsampling {factor}")
    shape = [autoencoder.config.latent_channels, image_size // factor, image_size // factor]
    mine = list(range(rank, len(items), world))
    latents, labels = [], []
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    for chunk in tqdm(chunks, desc=f"encoding ({world} process{'es' * (world > 1)})",
                      disable=not (progress and rank == 0)):
        x = read_images([items[i][0] for i in chunk], image_size).to(device)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed((seed << 32) + i))
                             for i in chunk])
        latents.append(encode(autoencoder, x, noise).to("cpu", SHARD_DTYPE))
        labels.extend(items[i][1] for i in chunk)
    out.mkdir(parents=True, exist_ok=True)
    name = f"shard-{rank:05d}-of-{world:05d}.pt"
    torch.save({"latents": torch.cat(latents) if latents else torch.empty(0, *shape, dtype=SHARD_DTYPE),
                "labels": torch.tensor(labels, dtype=torch.long),
                "indices": torch.tensor(mine, dtype=torch.long)}, out / name)  # positions in the sorted folder
    counts = distributed.sum_across(torch.tensor([len(labels)], device=device), world)
    manifest = {"format": "dydit_lab latents 1", "classes": classes, "shape": shape, "num_latents": int(counts),
                "image_size": image_size, "scaling_factor": LATENT_SCALE, "dtype": str(SHARD_DTYPE).split(".")[-1],
                "vae": str(Path(vae).resolve()), "images": str(Path(images).resolve()),
                "shards": [f"shard-{r:05d}-of-{world:05d}.pt" for r in range(world)]}
    distributed.barrier(world)
    if rank == 0:  # last: a folder with a manifest is complete
        (out / LATENT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    distributed.finish(world)
    return manifest

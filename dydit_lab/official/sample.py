"""Sampling a checkpoint to files (``python -m dydit_lab sample``): a PNG grid, optionally one PNG
per image and ADM's ``.npz``, with the FLOPs fraction the run really used and its seconds per
image.

Lab checkpoints sample in pixel space; a latent model (4 input channels, e.g. the released
DiT-XL/2 or DyDiT-XL) samples latents that a user's VAE folder decodes. A DyDiT runs its
really-skipping (sliced) path. Under ``torchrun`` the batches are dealt to the ranks in turn;
batch k is seeded ``seed + k`` whatever the number of ranks, so the images depend only on the
seed and the batch size, and rank 0 gathers every image into the ``.npz`` through the process
group (in chunks; no filesystem shared between nodes is needed).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..models import flops as flops_lib
from ..checkpoints import load_model
from ..diffusion import GaussianDiffusion
from ..models.dit import ModelWrapper
from ..models.dydit import DyDiT
from . import distributed
from .vae import LATENT_CHANNELS, check_vae_fits, decode, load_vae

GRID_MAX = 64  # images in the PNG grid (the first ones)
GRID_COLUMNS = 8
GRID_PAD = 2


class CostMeter(ModelWrapper):
    """Wraps the sampled model and adds up what its forwards cost, without a host sync.

    For a DyDiT the routing of every forward is summed per model timestep on the device.
    The FLOPs are exact from those sums: all samples at one timestep share their heads and
    groups (TDW reads only t), and a block's MLP cost is linear in its kept tokens once the
    groups are fixed.
    """

    def __init__(self, model, num_timesteps: int = 1000):
        super().__init__(model)
        self.dynamic = isinstance(model, DyDiT)
        depth, device = model.config.depth, next(model.parameters()).device
        self.counts = torch.zeros(num_timesteps, depth, 3, dtype=torch.float64, device=device)
        self.samples = torch.zeros(num_timesteps, dtype=torch.float64, device=device)

    def forward(self, x, t, y):
        if not self.dynamic:
            return self.model(x, t, y)
        out, routing = self.model(x, t, y, return_routing=True)
        idx = t.to(self.counts.device)
        self.counts.index_add_(0, idx, routing.counts().to(torch.float64))
        self.samples.index_add_(0, idx, torch.ones(len(t), dtype=torch.float64, device=idx.device))
        return out

    def flops_fraction(self, world: int = 1) -> float:
        """MACs of every forward (all ranks) over those of the static model; a static model
        answers by formula (:meth:`DiT.sampling_cost`)."""
        if not self.dynamic:
            return float(self.model.sampling_cost(1)["flops_fraction"])
        counts, samples = (distributed.sum_across(v.clone(), world).cpu() for v in (self.counts, self.samples))
        if samples.sum() == 0:
            return 1.0
        total = 0.0
        for t in samples.nonzero().squeeze(1).tolist():
            mean = (counts[t] / samples[t]).tolist()  # per block: heads, groups, kept tokens
            total += float(samples[t]) * flops_lib.dynamic_model_flops(self.config, mean)
        return total / (float(samples.sum()) * flops_lib.analytic_flops(self.config)["total"])


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """``"207,360"`` -> [207, 360], each checked against the model's classes (one-line error)."""
    if text is None or not text.strip():
        return None
    try:
        classes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--classes takes comma-separated class indices, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    return classes


def sample_labels(classes: list[int] | None, num_samples: int | None, num_classes: int) -> torch.Tensor:
    """The label of every image: ``classes`` in turn, or 0, 1, 2, ... when none are given.
    ``num_samples`` defaults to one image per given class (or min(num_classes, 16))."""
    if num_samples is None:
        num_samples = len(classes) if classes else min(num_classes, 16)
    if num_samples < 1:
        raise ValueError(f"--num-samples must be positive, got {num_samples}")
    cycle = torch.tensor(classes) if classes else torch.arange(num_classes)
    return cycle[torch.arange(num_samples) % len(cycle)]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as DiT's ``sample_ddp.py`` does."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def as_pil(image: np.ndarray) -> Image.Image:
    """An (H, W, C) uint8 image as PIL: grey for one channel, RGB for three."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def write_grid(images: np.ndarray, path: Path) -> Path:
    """The first ``GRID_MAX`` images, ``GRID_COLUMNS`` a row, on a black 2-pixel grid."""
    images = images[:GRID_MAX]
    n, h, w, c = images.shape
    cols = min(n, GRID_COLUMNS)
    rows = math.ceil(n / cols)
    grid = np.zeros((GRID_PAD + rows * (h + GRID_PAD), GRID_PAD + cols * (w + GRID_PAD), c), np.uint8)
    for i, image in enumerate(images):
        top, left = GRID_PAD + (i // cols) * (h + GRID_PAD), GRID_PAD + (i % cols) * (w + GRID_PAD)
        grid[top:top + h, left:left + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    as_pil(grid).save(path)
    return path


def write_npz(images: np.ndarray, path: Path) -> Path:
    """ADM's evaluation format: ``arr_0``, uint8 (N, H, W, 3); grey images are repeated to RGB."""
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images)
    return path


def _check_paths(out: Path, npz: Path | None) -> None:
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    if npz is not None and npz.suffix != ".npz":
        raise ValueError(f"--npz must name a .npz file, got {npz}")


def sample_to_files(checkpoint: str | Path, out: str | Path, *, arch: str | None = None, vae: str | Path | None = None,
                    classes: str | None = None, num_samples: int | None = None, steps: int = 250,
                    method: str = "ddpm", cfg_scale: float = 1.5, seed: int = 0, batch_size: int = 32,
                    device: str = "auto", out_dir: str | Path | None = None, npz: str | Path | None = None,
                    progress: bool = True) -> dict:
    """Sample ``checkpoint`` and write the PNG grid ``out`` (plus one PNG per image in ``out_dir``
    and ADM's ``.npz`` at ``npz``; under torchrun the ``.npz`` is always written, by default next
    to ``out``). Returns a summary (on every rank; the files come from rank 0)."""
    out, npz = Path(out), (Path(npz) if npz else None)
    _check_paths(out, npz)
    if batch_size < 1 or steps < 1:
        raise ValueError(f"--batch-size and --steps must be positive, got {batch_size} and {steps}")
    rank, world, device = distributed.start(device)
    if world > 1 and npz is None:
        npz = out.with_suffix(".npz")
    model = load_model(checkpoint, arch=arch, device=device)
    labels = sample_labels(parse_classes(classes, model.num_classes), num_samples, model.num_classes)
    autoencoder = None
    if vae is not None:
        autoencoder = load_vae(vae, device)
        check_vae_fits(autoencoder, model, vae)
    elif model.in_channels == LATENT_CHANNELS:
        raise ValueError(f"{checkpoint} is a latent model ({LATENT_CHANNELS} input channels): "
                         "give --vae DIR, a local AutoencoderKL folder (e.g. sd-vae-ft-ema)")

    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma).respaced(steps)
    meter = CostMeter(model)
    size, channels = model.config.input_size, model.in_channels
    batches = [b for b in enumerate(labels.split(batch_size)) if b[0] % world == rank]
    bar = tqdm(total=len(batches) * steps, desc=f"sampling ({world} process{'es' * (world > 1)})",
               disable=not (progress and rank == 0))
    if out_dir is not None and rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    distributed.barrier(world)
    start = time.perf_counter()
    images, indices = [], []
    for k, y in batches:
        x = diffusion.sample(meter, y.to(device), (len(y), channels, size, size), method=method,
                             cfg_scale=cfg_scale, seed=seed + k, clip_denoised=autoencoder is None,
                             progress=False, callback=lambda *_: bar.update(1))
        batch = to_uint8(decode(autoencoder, x) if autoencoder is not None else x)
        first = k * batch_size
        if out_dir is not None:
            for i, image in enumerate(batch):
                as_pil(image).save(Path(out_dir) / f"{first + i:06d}.png")
        images.append(batch)
        indices.extend(range(first, first + len(batch)))
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    local = np.concatenate(images) if images else np.empty((0, 0, 0, 0), np.uint8)
    every = distributed.gather_rows(local, indices, len(labels), rank, world, device)
    seconds = time.perf_counter() - start
    summary = {"checkpoint": str(checkpoint), "model": type(model).__name__, "arch": model.arch,
               "num_samples": len(labels), "processes": world, "steps": steps, "method": method,
               "cfg_scale": cfg_scale, "flops_fraction": meter.flops_fraction(world),
               "seconds_per_image": seconds / len(labels), "out": str(out)}
    if rank == 0:
        write_grid(every, out)
        if npz is not None:
            summary["npz"] = str(write_npz(every, npz))
        if out_dir is not None:
            summary["out_dir"] = str(out_dir)
    distributed.finish(world)
    return summary

"""Sampling a checkpoint as it will be used: generation, timing, and quality + compute together.

:func:`generate` draws balanced class-conditional samples from any model; :func:`sampling_model`
builds what a checkpoint is sampled with (plain, a FlexiDiT schedule, a DyDiT with its gates on);
and :func:`timed_generate` times it.
"""

from __future__ import annotations

import time
from pathlib import Path
import torch
from tqdm.auto import tqdm

from ..caching import cached_model
from ..checkpoints import load_model
from ..diffusion import GaussianDiffusion
from ..models.dydit import CompleteModel, DyDiT
from ..models.flexidit import FlexiDiT, scheduled_model


@torch.no_grad()
def generate(model, num_samples: int, steps: int = 50, method: str = "ddim", cfg_scale: float = 1.0,
             seed: int = 0, batch_size: int = 250, device="cpu", progress: bool = True):
    """Balanced class-conditional samples (label i % num_classes) and their labels, on CPU."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"number of samples must be a positive integer, got {num_samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    was_training = model.training
    model.eval()
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma).respaced(steps)
    labels = torch.arange(num_samples) % model.num_classes
    size, channels = model.config.input_size, model.in_channels
    out = []
    for i, y in enumerate(tqdm(labels.split(batch_size), desc="sampling", disable=not progress)):
        out.append(diffusion.sample(model, y.to(device), (len(y), channels, size, size), method=method,
                                    cfg_scale=cfg_scale, seed=seed + i, progress=False).cpu())
    model.train(was_training)
    return torch.cat(out), labels


# ---------------------------------------------------------------------------
# One checkpoint, one sampling setting: quality, compute and wall-clock together
# ---------------------------------------------------------------------------


def sampling_model(checkpoint: str | Path, steps: int = 50, coarse_steps: int | None = None,
                   complete_model: bool = False, device="cpu", saved: dict | None = None,
                   complete_from_t: int = 0, cache: str | None = None):
    """The model to sample a checkpoint with: as loaded, or a FlexiDiT whose first
    ``coarse_steps`` of ``steps`` run coarse, or a DyDiT with every gate on (at t >=
    ``complete_from_t``, see :class:`CompleteModel`), or a DiT / DyDiT with the feature-caching
    policy ``cache`` names (a spec, see :func:`dydit_lab.caching.parse_cache_spec`).

    ``saved``: the checkpoint already read from ``checkpoint``, so it is not read twice.
    """
    model = load_model(checkpoint if saved is None else saved, device=device)
    if cache:
        if coarse_steps is not None or complete_model:
            raise ValueError("--cache cannot be combined with --coarse-steps or --complete-model")
        return cached_model(model, cache)
    if coarse_steps is not None:
        if not isinstance(model, FlexiDiT):
            raise ValueError(f"--coarse-steps needs a FlexiDiT checkpoint; {checkpoint} holds a "
                             f"{type(model).__name__}")
        model = scheduled_model(model, coarse_steps, steps)
    if complete_model:
        if not isinstance(model, DyDiT):
            raise ValueError(f"--complete-model needs a DyDiT checkpoint; {checkpoint} holds a "
                             f"{type(model).__name__}")
        model = CompleteModel(model, complete_from_t)
    elif complete_from_t:
        raise ValueError("--complete-from-t needs --complete-model")
    return model


def timed_generate(model, num_samples: int, steps: int = 50, device="cpu", **options):
    """:func:`generate`, plus its wall-clock seconds per image (CUDA work waited for)."""
    start = time.perf_counter()
    samples, labels = generate(model, num_samples, steps=steps, device=device, **options)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return samples, labels, (time.perf_counter() - start) / num_samples

"""What a trained DyDiT does over a sampling run: per step, sample and block, its heads, MLP
groups and kept tokens (:class:`RoutingTrace`, recorded by :func:`trace_sampling`), and its
learned width schedule at every timestep, read off the routers alone (:class:`WidthSchedule`).

Works for the lab's pixel-space DyDiTs and for latent ones such as a released DyDiT-XL, whose
samples a user's VAE decodes (:mod:`dydit_lab.official.vae`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from ..checkpoints import load_model
from ..diffusion import GaussianDiffusion
from ..models.dydit import DyDiT, RoutingRecorder
from ..official.vae import LATENT_CHANNELS, decode, downsampling


def load_dydits(checkpoints: str | Path | Mapping[str, str | Path], device="cpu") -> dict[str, DyDiT]:
    """The DyDiTs to analyse by name: one checkpoint path (named after its file, e.g. a released
    ``new_dydit0.5.pt``) or a mapping name -> path. Anything but a DyDiT is a ``ValueError``."""
    if isinstance(checkpoints, (str, Path)):
        checkpoints = {Path(checkpoints).stem: checkpoints}
    models = {}
    for name, path in checkpoints.items():
        model = load_model(path, device=device)
        if not isinstance(model, DyDiT):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a DyDiT: it has no routers to show")
        models[name] = model.eval()
    return models


def describe_models(models: Mapping[str, DyDiT], vae=None) -> pd.DataFrame:
    """What was loaded, one row per model: architecture, router layout (that of the 2025 DyDiT
    release, head / group 0 always on, or of the December 2024 one), parameters, the model's
    input and the images a sampling run ends in (the VAE's decoding of latents, when given)."""
    rows = []
    for name, model in models.items():
        size = model.config.input_size
        side = size * downsampling(vae) if vae is not None else size
        channels = vae.config.out_channels if vae is not None else model.in_channels
        rows.append({
            "model": name, "arch": model.arch,
            "routers": "2025 release" if model.blocks[0].attn_rate.always_on_first else "December 2024 release",
            "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "input": f"{model.in_channels}x{size}x{size}",
            "images": f"{channels}x{side}x{side}" + (", VAE-decoded" if vae is not None else "")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# The learned width schedule (TDW reads only the timestep embedding)
# ---------------------------------------------------------------------------


@dataclass
class WidthSchedule:
    """A DyDiT's TDW widths at every timestep, from its routers alone (no sampling).

    ``heads``/``groups``: (T, 1, depth, H) 0/1, timesteps noisy first, the layout of a
    :class:`RoutingTrace` with one sample, so the width plots take either.
    """

    name: str
    timesteps: list[int]
    heads: torch.Tensor
    groups: torch.Tensor


@torch.no_grad()
def width_schedule(model: DyDiT, timesteps=range(999, -1, -1), name: str | None = None) -> WidthSchedule:
    """The heads and MLP groups every block of ``model`` keeps at each of ``timesteps``: the
    same width plans its sampling runs use (:meth:`DyDiT.plan_timesteps`)."""
    timesteps = [int(t) for t in timesteps]
    plans = model.eval().plan_timesteps(timesteps)
    stack = lambda key: torch.stack([getattr(plans[t], key) for t in timesteps]).unsqueeze(1).cpu()  # noqa: E731
    return WidthSchedule(name or model.arch or "DyDiT", timesteps, stack("heads"), stack("groups"))


def width_summary(schedules: Mapping[str, WidthSchedule], bins: int = 4) -> pd.DataFrame:
    """Share of heads and MLP groups on, over all blocks, in ``bins`` equal ranges of t."""
    rows = []
    for name, schedule in schedules.items():
        t = torch.tensor(schedule.timesteps)
        edges = torch.linspace(0, int(t.max()) + 1, bins + 1).round().long().tolist()
        for low, high in zip(edges[:-1], edges[1:]):
            inside = (t >= low) & (t < high)
            if inside.any():
                rows.append({"model": name, "t": f"{low}-{high - 1}",
                             "heads_active": float(schedule.heads[inside].float().mean()),
                             "groups_active": float(schedule.groups[inside].float().mean())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Router schedules of a DyDiT sampling run
# ---------------------------------------------------------------------------


@dataclass
class RoutingTrace:
    """What a DyDiT did over one sampling run (steps in sampling order: noisy first).

    ``heads``/``groups``: (S, B, depth, H) 0/1; ``tokens``: (S, B, depth, N) 0/1;
    ``x_t``: (S, B, C, H, W) the model inputs; ``flops_fraction``: (S,) mean over samples
    of the whole-model FLOPs fraction; ``samples``: the final images (decoded by the VAE
    for a latent model given one, else the model's own output space).
    With guidance the unconditional half of each forward is left out of the per-sample
    records; ``flops_fraction`` counts both halves (the run's cost).
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
                   device="cpu", progress: bool = True, name: str | None = None,
                   cfg_scale: float = 1.0, vae=None) -> RoutingTrace:
    """Sample ``labels`` with a DyDiT and record its routing at every step.

    A latent model (4 input channels) samples unclipped latents; ``vae`` (an AutoencoderKL,
    :func:`dydit_lab.official.vae.load_vae`) decodes them into the trace's ``samples``.
    """
    labels = torch.as_tensor(labels).long()
    recorder = RoutingRecorder(model.eval(), keep_inputs=True)
    cfg = model.config
    diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps)
    shape = (len(labels), model.in_channels, cfg.input_size, cfg.input_size)
    samples = diffusion.sample(recorder, labels.to(device), shape, method=method, seed=seed,
                               cfg_scale=cfg_scale, clip_denoised=model.in_channels != LATENT_CHANNELS,
                               progress=progress)
    if vae is not None:
        samples = decode(vae, samples.to(next(vae.parameters()).device))
    mine = slice(0, len(labels))  # the conditional half when guided
    stack = lambda key: torch.stack([getattr(r, key)[mine] for r in recorder.records])  # noqa: E731
    fractions = torch.stack([r.flops_fraction(cfg).mean() for r in recorder.records])
    return RoutingTrace(
        name=name or (model.arch or "DyDiT"), timesteps=[int(r.t[0]) for r in recorder.records],
        labels=labels, x_t=torch.stack([x[mine] for x in recorder.inputs]), heads=stack("heads"),
        groups=stack("groups"), tokens=stack("tokens"), flops_fraction=fractions,
        samples=samples.float().cpu(), patch_size=model.patch_size)

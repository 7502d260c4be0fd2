"""What a trained DyDiT does over a sampling run: per step, sample and block, its heads, MLP
groups and kept tokens (:class:`RoutingTrace`), recorded by :func:`trace_sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import GaussianDiffusion
from ..models.dydit import RoutingRecorder


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

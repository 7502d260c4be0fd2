"""What the speed benchmark runs on: a random-weight static DiT with a DyDiT on the same weights,
and real-looking inputs, one batch per sampled timestep of a respaced process.

No training is involved: speed depends only on the shapes, so random weights serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion import GaussianDiffusion
from ..models.configs import get_config
from ..models.dit import DiT, create_model
from ..models.dydit import DyDiT


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def build_models(arch: str, input_size: int = 32, device: str | torch.device = "cpu",
                 seed: int = 0) -> tuple[DiT, DyDiT]:
    """A random-weight DiT of ``arch`` and a DyDiT on the same weights, both in eval mode.

    adaLN-Zero starts every block as the identity and the output at zero; those layers get
    small random weights here so that activations (and the token routers reading them) and
    outputs are not trivial. Speed depends only on the shapes.
    """
    get_config(arch, input_size=input_size)  # ValueError for a bad arch / size, before building
    torch.manual_seed(seed)
    dit = create_model(arch, input_size=input_size)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        zero_init = [b.adaLN_modulation[-1] for b in dit.blocks]
        zero_init += [dit.final_layer.adaLN_modulation[-1], dit.final_layer.linear]
        for layer in zero_init:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.02)
    device = torch.device(device)
    dit = dit.to(device).eval()
    dydit = DyDiT.from_dit(dit).eval()
    return dit, dydit


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@dataclass
class BenchInputs:
    """One batch per sampled timestep, in sampling order (noisiest first)."""

    timesteps: list[int]        # base (1000-step) timesteps given to the model
    x: list[torch.Tensor]       # (B, C, H, W) noised latents, one per timestep
    t: list[torch.Tensor]       # (B,) timesteps, on the host as a sampler passes them
    y: torch.Tensor             # (B,) labels, shared by all steps

    @property
    def batch_size(self) -> int:
        return len(self.y)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All steps as one batch (step-major)."""
        return torch.cat(self.x), torch.cat(self.t), self.y.repeat(len(self.x))


def make_inputs(model: DiT, batch_size: int, steps: int, seed: int = 0) -> BenchInputs:
    """Real-looking inputs: a smooth random latent noised to each of the ``steps`` timesteps
    of a respaced process (same latent and noise at every step), random labels."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    process = GaussianDiffusion().respaced(steps)  # ValueError for steps outside [1, 1000]
    timesteps = sorted(process.timestep_map, reverse=True)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    low = max(1, cfg.input_size // 4)
    x0 = torch.randn(batch_size, cfg.in_channels, low, low, generator=gen)
    x0 = F.interpolate(x0, size=(cfg.input_size,) * 2, mode="bilinear", align_corners=False)
    x0 = x0 / x0.std()
    noise = torch.randn(x0.shape, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen)
    base = GaussianDiffusion()
    device = next(model.parameters()).device
    xs, ts = [], []
    for t in timesteps:
        tt = torch.full((batch_size,), t, dtype=torch.long)
        xs.append(base.q_sample(x0, tt, noise).float().to(device))
        ts.append(tt)  # host timesteps: models move them, and read plans without a device sync
    return BenchInputs(timesteps, xs, ts, y.to(device))

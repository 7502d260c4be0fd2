"""Where a caching policy breaks down: the same noise and labels sampled through the plain model
and through each policy, and after every step the distance between the two trajectories, next
to the blocks that step computed (notebook 05).

Reuse saves compute only by returning stale features; a policy that reuses little stays on the
plain trajectory, one that reuses much drifts off it, and token reuse (ToCa) accumulates the
error of its stale tokens between full steps. ``caching_drift`` measures both on a few samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..diffusion import GaussianDiffusion
from ..models.dit import DiT
from .model import summarise
from .spec import cached_model


@dataclass
class CachingDrift:
    """``summary``: one row per setting (``setting``, ``spec``, ``flops_fraction`` of the static
    run, ``blocks_computed``, ``final_error``: the relative L2 distance of its final samples
    from the plain run's). ``per_step``: per setting and step (0: the noisiest), ``t``,
    ``error`` (the same distance for x_t after that step), the ``blocks`` computed at it (in
    full or, for ToCa, in part) and its ``flops_fraction`` of a static step."""

    summary: pd.DataFrame
    per_step: pd.DataFrame


def relative_distance(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of ||x - reference|| / ||reference|| (flattened per sample)."""
    diff = (x - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


@torch.no_grad()
def caching_drift(model: DiT, specs: Mapping[str, str], steps: int = 50, num_samples: int = 8,
                  seed: int = 0, method: str = "ddim", device="cpu", progress: bool = True) -> CachingDrift:
    """Sample ``num_samples`` digits (labels 0, 1, ...) with ``model`` plain and with each cache
    spec of ``specs`` (setting name -> spec, e.g. ``{"FORA N = 3": "fora:3"}``), from the same
    noise, and measure how far each cached trajectory is from the plain one (see
    :class:`CachingDrift`). ``model`` is a DiT or a DyDiT in eval mode."""
    if not specs:
        raise ValueError("give at least one cache spec, e.g. {'FORA N = 2': 'fora:2'}")
    if steps < 1 or num_samples < 1:
        raise ValueError(f"steps and num_samples must be positive, got {steps} and {num_samples}")
    model.eval()
    cfg = model.config
    diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps)
    y = (torch.arange(num_samples) % model.num_classes).to(device)
    shape = (num_samples, model.in_channels, cfg.input_size, cfg.input_size)

    def trajectory(sampled) -> list[tuple[int, torch.Tensor]]:
        states: list[tuple[int, torch.Tensor]] = []
        diffusion.sample(sampled, y, shape, method=method, seed=seed, progress=False,
                         callback=lambda i, t, x: states.append((t, x.detach().cpu().clone())))
        return states

    plain = trajectory(model)
    summary, per_step = [], []
    for setting, spec in tqdm(specs.items(), desc="caching drift", disable=not progress):
        cached = cached_model(model, spec)
        states = trajectory(cached)
        cost = summarise(cfg, cached.records)
        for step, ((t, x), (_, reference), blocks, fraction) in enumerate(
                zip(states, plain, cost["per_step_blocks"], cost["per_step_fraction"])):
            per_step.append({"setting": setting, "step": step, "t": t, "error": relative_distance(x, reference),
                             "blocks": blocks, "flops_fraction": fraction})
        summary.append({"setting": setting, "spec": spec, "flops_fraction": cost["flops_fraction"],
                        "blocks_computed": cost["blocks_computed"],
                        "final_error": per_step[-1]["error"]})  # the last step's x_t is the sample
    return CachingDrift(pd.DataFrame(summary), pd.DataFrame(per_step))

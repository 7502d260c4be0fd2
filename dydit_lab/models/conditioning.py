"""Conditioning planned ahead: every block's adaLN modulation for a whole sampling run at once.

A DiT block's adaLN-Zero reads only the conditioning vector c = t_emb + y_emb, and a sampler
knows every (timestep, label) pair of its run before the first step. So each block's
modulation for all steps can come from one matrix product over the run, which reads the
block's (6C x C) weight once instead of once per step. At small batches that read is the
whole cost of the product (DiT-XL/2: 32 MB per block, 28 blocks per step), on the static and
on the dynamic model alike. The values match the per-step products to float rounding.

:meth:`DiT.plan_conditioning` makes a plan (samplers call it once); the model's forward looks
each step up (:func:`lookup`) and falls back to computing c's modulation when the step is not
planned, its labels differ, its batch mixes timesteps, or a weight changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLAN_MEMORY_BYTES = 256 * 2**20  # most a plan holds; a longer run is planned in windows of steps
MIN_PLAN_STEPS = 4  # a product over a few rows can cost more than the one-row products it replaces


@dataclass
class ConditioningPlan:
    """The modulation of every block for a window of a sampling run's steps."""

    labels: torch.Tensor             # (B,) the labels every planned step is called with
    schedule: list[int]              # the run's model timesteps, in sampling order
    window: int                      # steps planned at a time (memory cap)
    signature: tuple                 # the conditioning weights' versions when planned
    steps: dict[int, int]            # planned timestep -> its index in ``modulation``
    modulation: list[torch.Tensor]   # per block: (window, B, 6C)


def conditioning_signature(model) -> tuple:
    """Changes whenever a weight that the modulation reads is updated in place, replaced or moved."""
    modules = [model.t_embedder, model.y_embedder, *(b.adaLN_modulation for b in model.blocks)]
    return tuple((p._version, p.data_ptr()) for m in modules for p in m.parameters())


def plan_window(model, batch_size: int, num_steps: int) -> int:
    """How many steps one plan holds within :data:`PLAN_MEMORY_BYTES` (at most ``num_steps``)."""
    weight = model.blocks[0].adaLN_modulation[-1].weight
    per_step = batch_size * len(model.blocks) * weight.shape[0] * weight.element_size()
    return min(num_steps, PLAN_MEMORY_BYTES // max(per_step, 1))


def make_plan(model, timesteps, labels: torch.Tensor) -> ConditioningPlan | None:
    """A plan for a run over ``timesteps`` (model timesteps, sampling order) called with
    ``labels``; None for a run shorter than :data:`MIN_PLAN_STEPS` or when fewer steps than
    that fit in memory (or no labels: nothing to plan)."""
    schedule = list(dict.fromkeys(int(v) for v in timesteps))
    window = plan_window(model, len(labels), len(schedule))
    if window < MIN_PLAN_STEPS or not len(labels):
        return None
    plan = ConditioningPlan(labels, schedule, window, (), {}, [])
    _fill(model, plan, start=0)
    return plan


@torch.no_grad()
def _fill(model, plan: ConditioningPlan, start: int) -> None:
    """Plan the window of steps that begins at ``start`` in the schedule: one product per block."""
    steps = plan.schedule[start:start + plan.window]
    device = model.pos_embed.device
    batch = len(plan.labels)
    t = torch.tensor(steps, device=device).repeat_interleave(batch)
    c = model.t_embedder(t) + model.y_embedder(plan.labels.to(device).repeat(len(steps)), False)
    plan.modulation = [b.adaLN_modulation(c).view(len(steps), batch, -1) for b in model.blocks]
    plan.steps = {v: i for i, v in enumerate(steps)}
    plan.signature = conditioning_signature(model)


def lookup(model, plan: ConditioningPlan | None, t: torch.Tensor, y: torch.Tensor) -> list | None:
    """Per block, the planned (shift, scale, gate) x 2 of this call, or None if it is not planned.

    Planned calls share one host timestep (as a sampler's do) and the plan's labels (the same
    tensor, or equal ones on the same device)."""
    if plan is None or model.training or t.device.type != "cpu" or not len(t):
        return None
    if y is not plan.labels and (y.device != plan.labels.device or not torch.equal(y, plan.labels)):
        return None
    step = int(t[0])
    if step not in plan.schedule or not bool((t == step).all()):
        return None
    if step not in plan.steps or plan.signature != conditioning_signature(model):
        _fill(model, plan, plan.schedule.index(step))  # the next window, or new weights
    return [m[plan.steps[step]].chunk(6, dim=1) for m in plan.modulation]

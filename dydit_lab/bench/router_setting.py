"""Router setting for the speed benchmark: a DyDiT's routers set to a FLOPs target.

No training is involved. The routers are *set* deterministically so that the exact counted
FLOPs of the sampled timesteps (whole model, routers included, as
:meth:`Routing.flops_fraction`) average to ``target_ratio``:

* **Width (TDW).** A least-squares fit gives a direction ``w`` and offset ``b`` with
  ``s(t) = w . t_emb(t) + b ~ t / 999`` (the normalised noise level; exact on the sampled
  timesteps). Switchable unit ``k`` (1..H-1) of block ``j`` gets a rank ``r_jk`` in [0, 1),
  staggered across blocks so the cost moves in fine steps, and the logit
  ``scale * (knob - slope * s(t) - r_jk)``: it is on while ``r_jk < knob - slope * s(t)``, so
  the width shrinks toward noisy (large) timesteps. Unit 0 is always on.
* **Tokens (SDT).** On real activations (one masked pass over the batch of every sampled
  timestep) each block's token head is made a linear score of the residual stream with a
  bias at the quantile that keeps ``keep_rate`` of the tokens (pooled over the steps).
* **Search.** ``knob`` is chosen among the plateaus of the (staircase) cost, at a plateau
  midpoint so no gate sits on its threshold; the token calibration is rerun with the new
  widths, and when the width settles the keep rate is nudged, until the measured fraction is
  within ``tolerance / 2`` of the target.

The timed run then counts the FLOPs of the routing it actually used (``flops_ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import flops as flops_lib
from ..models.configs import DiTConfig
from ..models.dydit import DyDiT
from ..models.routers import Routing
from .workload import BenchInputs

DEFAULT_KEEP_RATE = 0.75   # SDT: share of tokens that run the MLP (before the final nudge)
DEFAULT_WIDTH_SLOPE = 0.6  # TDW: width share lost from t = 0 to t = 999
ROUTER_SCALE = 100.0       # logit = ROUTER_SCALE * margin: decisive gates
TOLERANCE = 0.02           # |counted fraction - target| allowed
KEEP_MARGIN = 0.03         # the width must have this much room around the target
SCORE_STD = 10.0           # token scores are scaled to this spread (clear of sigmoid rounding)
MAX_ITERATIONS = 12


# ---------------------------------------------------------------------------
# FLOPs helpers
# ---------------------------------------------------------------------------


def check_target(config: DiTConfig, target_ratio: float) -> None:
    floor, _ = flops_lib.dydit_flops_bounds(config)
    if not (math.isfinite(target_ratio) and floor <= target_ratio <= 1.0):
        raise ValueError(
            f"target ratio {target_ratio} cannot be reached: a DyDiT of this config runs between "
            f"{floor:.4f} (head 0, group 0, no token in every block) and 1.0 of the static FLOPs")


def _fractions(config: DiTConfig, heads, groups, kept) -> torch.Tensor:
    """Per-sample FLOPs fractions from counts (S, depth) each."""
    total = flops_lib.analytic_flops(config)["total"]
    rows = torch.stack([heads, groups, kept], -1).tolist()
    return torch.tensor([flops_lib.dynamic_model_flops(config, [tuple(r) for r in sample]) / total
                         for sample in rows], dtype=torch.float64)


def _mean_fraction(config, heads, groups, kept) -> float:
    """The cost of blocks at fractional mean counts (used only to choose the keep rate)."""
    total = flops_lib.analytic_flops(config)["total"]
    return flops_lib.dynamic_model_flops(config, [(heads, groups, kept)] * config.depth) / total


# ---------------------------------------------------------------------------
# Width routers (TDW)
# ---------------------------------------------------------------------------


@torch.no_grad()
def fit_noise_level(model: DyDiT, timesteps: list[int]) -> tuple[torch.Tensor, float, float]:
    """``(w, b, max_error)`` with ``w . t_emb(t) + b ~ t / 999``.

    Weighted ridge least squares over all 1000 timesteps, the sampled ones weighted 30x so
    the fit is (near) exact where it matters; ``max_error`` is on the sampled timesteps.
    """
    device = next(model.parameters()).device
    all_t = torch.arange(1000, device=device)
    samp = torch.tensor(sorted(timesteps), device=device)
    E = model.t_embedder(all_t).double().cpu()
    Es = model.t_embedder(samp).double().cpu()
    mu = E.mean(0)
    weight = 30.0
    X = torch.cat([E - mu, (Es - mu) * weight])
    ones = torch.cat([torch.ones(len(E)), torch.full((len(Es),), weight)]).double()
    X = torch.cat([X, ones[:, None]], 1)
    target = torch.cat([all_t.cpu().double() / 999, samp.cpu().double() / 999 * weight])
    lam = 1e-6 * (E - mu).pow(2).sum() / E.shape[1]
    reg = torch.eye(X.shape[1], dtype=torch.float64) * lam
    reg[-1, -1] = 0.0  # the offset is not shrunk
    sol = torch.linalg.solve(X.T @ X + reg, X.T @ target)
    w, b = sol[:-1], float(sol[-1] - sol[:-1] @ mu)
    err = float(((Es @ w + b) - samp.cpu().double() / 999).abs().max())
    return w, b, err


def _unit_ranks(depth: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth, H-1) ranks in [0, 1) of the switchable heads and MLP groups: unit k of block j
    sits at (k + o_j) / (H - 1), the offsets o_j staggered over blocks (groups interleaved)."""
    k = torch.arange(num_heads - 1, dtype=torch.float64)
    o = (torch.arange(depth, dtype=torch.float64) + 0.5) / depth
    heads = (k[None] + o[:, None]) / (num_heads - 1)
    groups = (k[None] + ((o + 0.5) % 1.0)[:, None]) / (num_heads - 1)
    return heads, groups


@torch.no_grad()
def set_width_routers(model: DyDiT, w: torch.Tensor, b: float, knob: float,
                      slope: float = DEFAULT_WIDTH_SLOPE, scale: float = ROUTER_SCALE) -> None:
    """Unit k of block j on iff ``rank_jk < knob - slope * (w . t_emb + b)``."""
    head_ranks, group_ranks = _unit_ranks(len(model.blocks), model.num_heads)
    for j, block in enumerate(model.blocks):
        for router, ranks in ((block.attn_rate.router, head_ranks[j]),
                              (block.mlp_rate.router, group_ranks[j])):
            weight = (-scale * slope * w).to(router.weight)
            router.weight.copy_(weight.expand_as(router.weight))
            router.bias.copy_((scale * (knob - slope * b - ranks)).to(router.bias))


# ---------------------------------------------------------------------------
# Token routers (SDT)
# ---------------------------------------------------------------------------


def _cut(score: torch.Tensor, keep_rate: float) -> float:
    """A threshold keeping ~keep_rate of ``score``, at the widest gap near the quantile."""
    s = score.flatten().double().cpu().sort(descending=True).values
    M = len(s)
    k0 = round(keep_rate * M)
    spread = float(s[0] - s[-1]) + 1.0
    if k0 <= 0:
        return float(s[0]) + spread
    if k0 >= M:
        return float(s[-1]) - spread
    half = max(1, M // 200)
    ks = torch.arange(max(1, k0 - half), min(M - 1, k0 + half) + 1)
    gaps = s[ks - 1] - s[ks]
    k = int(ks[gaps.argmax()])
    return float(s[k - 1] + s[k]) / 2


def _token_calibration_hook(keep_rate: float):
    """Forward pre-hook for ``token_selection.mlp_head``: make the head a linear score of the
    tokens it sees (first-layer bias lifts every ReLU input above 0: no ties at 0), scale it
    to SCORE_STD and set the last bias at the keep-rate quantile of these tokens."""

    def hook(module: nn.Sequential, args):
        x = args[0]
        lin1, lin2 = module[0], module[2]
        flat = x.reshape(-1, x.shape[-1])
        h = F.linear(flat, lin1.weight)
        lin1.bias.copy_(1.0 - h.min(0).values)
        lin2.weight.fill_(1.0)
        lin2.bias.zero_()
        score = F.linear(F.relu(h + lin1.bias), lin2.weight).squeeze(-1)
        lin2.weight.mul_(SCORE_STD / max(float(score.std()), 1e-12))
        score = F.linear(F.relu(h + lin1.bias), lin2.weight).squeeze(-1)
        lin2.bias.fill_(-_cut(score, keep_rate))

    return hook


@torch.no_grad()
def calibrate_token_routers(model: DyDiT, inputs: BenchInputs, keep_rate: float) -> Routing:
    """One masked pass over all steps at once; every block's token head is set on the fly
    (before its own decision, so later blocks see the final routing of earlier ones).
    Returns the routing of that pass (samples step-major)."""
    handles = [b.token_selection.mlp_head.register_forward_pre_hook(_token_calibration_hook(keep_rate))
               for b in model.blocks]
    execution = model.execution
    try:
        model.execution = "masked"
        _, routing = model(*inputs.stacked(), return_routing=True)
    finally:
        model.execution = execution
        for h in handles:
            h.remove()
    return routing.detach()


# ---------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------


@dataclass
class RouterSetting:
    """How the routers were set and what the calibration pass counted."""

    target_ratio: float
    knob: float
    width_slope: float
    keep_rate: float
    flops_ratio: float               # measured on the calibration pass
    iterations: int
    fit_max_error: float
    per_step: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"router_knob": self.knob, "width_slope": self.width_slope,
                "keep_rate_setting": self.keep_rate, "calibration_flops_ratio": self.flops_ratio,
                "calibration_iterations": self.iterations, "noise_fit_max_error": self.fit_max_error}


def _choose_keep_rate(config: DiTConfig, target: float, keep_rate: float) -> float:
    """``keep_rate``, moved only if the width alone could not reach ``target`` with it."""
    N, H = flops_lib.num_tokens(config), config.num_heads
    lo = lambda p: _mean_fraction(config, 1, 1, p * N)  # noqa: E731  (cost is linear in p)
    hi = lambda p: _mean_fraction(config, H, H, p * N)  # noqa: E731
    if hi(keep_rate) < target + KEEP_MARGIN:
        slope = hi(1.0) - hi(0.0)
        keep_rate = (target + KEEP_MARGIN - hi(0.0)) / slope
    elif lo(keep_rate) > target - KEEP_MARGIN:
        slope = lo(1.0) - lo(0.0)
        keep_rate = (target - KEEP_MARGIN - lo(0.0)) / slope
    return min(1.0, max(0.0, keep_rate))


@torch.no_grad()
def set_routers(model: DyDiT, inputs: BenchInputs, target_ratio: float, *,
                keep_rate: float = DEFAULT_KEEP_RATE, width_slope: float = DEFAULT_WIDTH_SLOPE,
                tolerance: float = TOLERANCE) -> RouterSetting:
    """Set every router of ``model`` (in place) so that the counted FLOPs fraction on
    ``inputs`` is within ``tolerance`` of ``target_ratio``; see the module docstring."""
    cfg = model.config
    check_target(cfg, target_ratio)
    if not 0.0 <= keep_rate <= 1.0:
        raise ValueError(f"keep_rate must lie in [0, 1], got {keep_rate}")
    if width_slope < 0:
        raise ValueError(f"width_slope must be >= 0, got {width_slope}")
    model.eval()
    steps, B, depth = len(inputs.timesteps), inputs.batch_size, cfg.depth
    N = flops_lib.num_tokens(cfg)
    w, b, fit_err = fit_noise_level(model, inputs.timesteps)

    # Plateaus of the width staircase: a gate flips where knob = slope * s(t_i) + rank.
    device = next(model.parameters()).device
    t_steps = torch.tensor(inputs.timesteps, device=device)
    t_emb = model.t_embedder(t_steps)
    s_hat = t_emb.double().cpu() @ w + b
    head_ranks, group_ranks = _unit_ranks(depth, model.num_heads)
    ranks = torch.cat([head_ranks.flatten(), group_ranks.flatten()])
    breaks = (width_slope * s_hat[:, None] + ranks[None]).flatten().sort().values
    breaks = breaks[torch.cat([torch.tensor([True]), breaks[1:] - breaks[:-1] > 1e-9])]
    knobs = torch.cat([breaks[:1] - 0.05, (breaks[1:] + breaks[:-1]) / 2, breaks[-1:] + 0.05]).tolist()

    def width_counts(knob: float) -> tuple[torch.Tensor, torch.Tensor]:
        set_width_routers(model, w, b, knob, width_slope)
        heads, groups = model.width_gates(t_emb)  # (steps, depth, H)
        rep = lambda g: g.sum(-1).double().cpu().repeat_interleave(B, dim=0)  # noqa: E731
        return rep(heads), rep(groups)

    def predicted(idx: int, kept: torch.Tensor) -> float:
        return float(_fractions(cfg, *width_counts(knobs[idx]), kept).mean())

    def best_plateau(kept: torch.Tensor) -> int:
        lo, hi = 0, len(knobs) - 1  # first plateau at or above the target, by bisection
        if predicted(hi, kept) < target_ratio:
            return hi
        while lo < hi:
            mid = (lo + hi) // 2
            if predicted(mid, kept) >= target_ratio:
                hi = mid
            else:
                lo = mid + 1
        if lo > 0 and abs(predicted(lo - 1, kept) - target_ratio) < abs(predicted(lo, kept) - target_ratio):
            return lo - 1
        return lo

    p = _choose_keep_rate(cfg, target_ratio, keep_rate)
    kept = torch.full((steps * B, depth), p * N, dtype=torch.float64)
    prev_idx, measured, per_sample = None, float("nan"), None
    for iteration in range(1, MAX_ITERATIONS + 1):
        idx = best_plateau(kept)
        set_width_routers(model, w, b, knobs[idx], width_slope)
        routing = calibrate_token_routers(model, inputs, p)
        per_sample = routing.flops_fraction(cfg).double()
        measured = float(per_sample.mean())
        kept = routing.tokens.sum(-1).double().cpu()
        if abs(measured - target_ratio) <= tolerance / 2:
            break
        if idx == prev_idx:
            # The width has settled: move the keep rate by the linearised cost of a token.
            mlp = flops_lib.block_flops(cfg, N)["mlp"] / N / model.num_heads
            d_cost = float((routing.groups.sum(-1).double().cpu() * N * mlp).sum(-1).mean())
            d_cost /= flops_lib.analytic_flops(cfg)["total"]
            if d_cost <= 0:
                break
            p = min(1.0, max(0.0, p + (target_ratio - measured) / d_cost))
        prev_idx = idx
    if abs(measured - target_ratio) > tolerance:
        raise RuntimeError(f"router setting reached {measured:.4f}, not {target_ratio} +- {tolerance}")
    per_step = per_sample.view(steps, B).mean(1).tolist()
    return RouterSetting(target_ratio, knobs[idx], width_slope, p, measured, iteration, fit_err, per_step)

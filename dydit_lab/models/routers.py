"""DyDiT's routers: timestep-wise dynamic width (TDW) and spatial-wise dynamic tokens (SDT).

Parameter names follow the official DyDiT layout (``attn_rate.router``, ``mlp_rate.router``,
``token_selection.mlp_head.0/2``) so official checkpoints load unchanged. The two DyDiT
releases differ only in the TDW routers' output size (see :class:`WidthRouter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import flops as flops_lib
from .dit import DiTConfig

GUMBEL_TAU = 5.0
TDW_INIT_BIAS = 15.0  # sigmoid(15) ~ 1: a converted DiT starts with every head and group on
SDT_INIT_BIAS = 35.0  # ... and every token through the MLP
SDT_REDUCTION = 16


def gate(logits: torch.Tensor, training: bool, tau: float = GUMBEL_TAU,
         noise_scale: float = 1.0) -> torch.Tensor:
    """Hard 0/1 gates with a straight-through gradient.

    Training: Gumbel-sigmoid, sigmoid((logit + noise_scale * (g1 - g2)) / tau) with two Gumbel
    samples, so the router explores; eval: sigmoid(logit). Either way the forward value is the
    hard threshold (> 0.5) and the backward pass uses the soft value's gradient.

    With noise a gate is on with probability sigmoid(logit); in eval it is on whenever the logit
    is positive. ``noise_scale`` < 1 (faded by the fine-tune) narrows that train/eval gap.
    """
    if training and noise_scale > 0:
        g1, g2 = (-torch.empty_like(logits).exponential_().log() for _ in range(2))
        soft = torch.sigmoid((logits + noise_scale * (g1 - g2)) / tau)
    elif training:
        soft = torch.sigmoid(logits / tau)
    else:
        soft = torch.sigmoid(logits)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class WidthRouter(nn.Module):
    """TDW router: timestep embedding (B, D) -> gates over H units (B, H).

    One router chooses attention heads, another MLP channel groups (the hidden layer split
    into H equal groups). It reads only the timestep embedding, so its decision is shared by
    every sample (and every class) at the same t: the basis of per-timestep weight slicing.

    ``always_on_first``: the 2025 release's layout (``Linear(D, H-1)``, unit 0 always on, our
    default); ``False`` is the December 2024 release's (``Linear(D, H)``, a gate per unit, so
    a block may switch every head or group off).
    """

    def __init__(self, dim: int, num_units: int, always_on_first: bool = True):
        super().__init__()
        self.num_units = num_units
        self.always_on_first = always_on_first
        self.router = nn.Linear(dim, num_units - int(always_on_first))
        self.noise_scale = 1.0  # Gumbel noise in training (see ``gate``)

    def logits(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.router(t_emb)

    def _with_first(self, gates: torch.Tensor) -> torch.Tensor:
        if not self.always_on_first:
            return gates
        return torch.cat([torch.ones_like(gates[:, :1]), gates], dim=1)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self._with_first(gate(self.logits(t_emb), self.training, noise_scale=self.noise_scale))

    @torch.no_grad()
    def eval_gates(self, t_emb: torch.Tensor) -> torch.Tensor:
        """The gates sampling uses (hard threshold, no noise), whatever the module's mode."""
        return self._with_first((torch.sigmoid(self.logits(t_emb)) > 0.5).to(t_emb.dtype))


ROUTER_RELEASES = {"2025": True, "2024": False}  # release -> always_on_first


def set_router_release(width_routers, release: str) -> None:
    """Give TDW routers the layout of a DyDiT release (``ROUTER_RELEASES``), in place.

    A router whose layout changes gets a fresh, zero-initialised ``Linear`` of the new shape
    (its weights are expected to be loaded next, e.g. from a checkpoint of that release).
    """
    if release not in ROUTER_RELEASES:
        raise ValueError(f"unknown DyDiT release {release!r}; choose one of {', '.join(ROUTER_RELEASES)}")
    always_on_first = ROUTER_RELEASES[release]
    for r in width_routers:
        if r.always_on_first != always_on_first:
            old = r.router
            r.router = nn.Linear(old.in_features, r.num_units - int(always_on_first),
                                 device=old.weight.device, dtype=old.weight.dtype)
            nn.init.zeros_(r.router.weight)
            nn.init.constant_(r.router.bias, TDW_INIT_BIAS)
            r.always_on_first = always_on_first


class TokenRouter(nn.Module):
    """SDT router: residual stream tokens (B, N, D) -> keep gates (B, N).

    A kept token runs the block's MLP; a dropped one passes its residual through unchanged.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_head = nn.Sequential(
            nn.Linear(dim, dim // SDT_REDUCTION), nn.ReLU(), nn.Linear(dim // SDT_REDUCTION, 1))
        self.noise_scale = 1.0  # Gumbel noise in training (see ``gate``)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gate(self.logits(x), self.training, noise_scale=self.noise_scale)


def init_routers_all_on(width_routers: list[WidthRouter], token_routers: list[TokenRouter],
                        tdw_bias: float = TDW_INIT_BIAS, sdt_bias: float = SDT_INIT_BIAS) -> None:
    """Start with every gate open for every input: zero weights into the logit, large bias.

    (The official init uses xavier weights with the same biases; zero weights make "all on"
    hold for any timestep embedding and any residual-stream magnitude, so a converted DiT
    reproduces its parent exactly. Any positive bias does that in eval mode; in training
    the Gumbel noise closes a gate with probability sigmoid(-bias), and a smaller bias lets a
    short fine-tune move the router sooner.)
    """
    if tdw_bias <= 0 or sdt_bias <= 0:
        raise ValueError("router init biases must be positive (every gate starts on)")
    for r in width_routers:
        nn.init.zeros_(r.router.weight)
        nn.init.constant_(r.router.bias, tdw_bias)
    for r in token_routers:
        nn.init.xavier_uniform_(r.mlp_head[0].weight)
        nn.init.zeros_(r.mlp_head[0].bias)
        nn.init.zeros_(r.mlp_head[2].weight)
        nn.init.constant_(r.mlp_head[2].bias, sdt_bias)


# ---------------------------------------------------------------------------
# Routing record
# ---------------------------------------------------------------------------


@dataclass
class Routing:
    """The gates a forward pass used, per sample and block (0/1 values; in training they
    carry straight-through gradients).

    heads (B, depth, H), groups (B, depth, H), tokens (B, depth, N), t (B,).
    """

    heads: torch.Tensor
    groups: torch.Tensor
    tokens: torch.Tensor
    t: torch.Tensor

    def counts(self) -> torch.Tensor:
        """(B, depth, 3) active heads, active MLP groups, kept tokens."""
        return torch.stack([self.heads.sum(-1), self.groups.sum(-1), self.tokens.sum(-1)], -1)

    def block_flops_fraction(self, config: DiTConfig, tokens: int | None = None) -> torch.Tensor:
        """Per-sample fraction of the blocks' attention + MLP MACs that ran (the quantity the
        official fine-tuning loss constrains; embedders, adaLN and final layer not counted).
        Differentiable through straight-through gates. ``tokens`` sets the sequence length
        the per-block costs are taken at (default: the routed one)."""
        parts = flops_lib.block_flops(config, tokens or self.tokens.shape[-1])
        H = self.heads.shape[-1]
        attn = parts["attn"] * self.heads.sum(-1) / H
        mlp = parts["mlp"] * (self.groups.sum(-1) / H) * self.tokens.mean(-1)
        return (attn + mlp).sum(-1) / (config.depth * (parts["attn"] + parts["mlp"]))

    def macs(self, config: DiTConfig, include_routers: bool = True) -> torch.Tensor:
        """Exact MACs of the whole forward, per sample (static parts charged in full)."""
        counts = self.counts().detach().cpu().tolist()
        return torch.tensor([
            float(flops_lib.dynamic_model_flops(config, [tuple(r) for r in sample],
                                                include_routers=include_routers))
            for sample in counts])

    def flops_fraction(self, config: DiTConfig, include_routers: bool = True) -> torch.Tensor:
        """Per-sample MACs as a fraction of the static DiT's."""
        return self.macs(config, include_routers) / flops_lib.analytic_flops(config)["total"]

    def detach(self) -> "Routing":
        return Routing(*(x.detach() for x in (self.heads, self.groups, self.tokens, self.t)))

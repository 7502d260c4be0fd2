"""ToCa (Zou et al. 2024, "Accelerating Diffusion Transformers with Token-wise Feature
Caching", ICLR 2025), as its DiT version works: every ``interval``-th step runs in full and
caches each block's attention and MLP outputs (before their adaLN gates) and its attention map;
in between, each block reuses its attention output, and recomputes the MLP only for the
``fraction`` of tokens that score highest. The score of a token: the attention it received at
the last full step (L2-normalised over tokens), plus ``staleness_weight`` x (steps since it was
last recomputed / interval), plus a bonus for the best token of each 2x2 patch neighbourhood
(spreads the fresh tokens over the image). The current step's adaLN gates are applied to the
cached outputs, so a cache step pays each block's adaLN, plus norm2 and the MLP on its fresh
tokens (:func:`dydit_lab.models.flops.partial_block_flops`). On a DyDiT the block runs at its planned
width, and its token router decides which fresh tokens the MLP runs on (it scores only those).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models import flops
from ..models.dit import gated_residual
from .policies import CachePolicy, _check

STALENESS_WEIGHT = 0.25  # ToCa's default weight of the cache-frequency score
NEIGHBOURHOOD_BONUS = 0.6  # ToCa's bonus for the best token of each 2x2 neighbourhood


def attention_with_received(block, h: torch.Tensor, width=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output of ``block`` on ``h`` (after ``proj``), written out so that the map is
    available, and the attention each token received (column sums of the head-averaged map).
    Same MACs as the fused kernel: q k^T and map v. ``width``: a DyDiT block's (heads, groups),
    only the active heads run (none: the output is ``proj``'s bias)."""
    attn, (B, N, C) = block.attn, h.shape
    if width is None:
        qkv_w, qkv_b, proj_w, heads = attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.num_heads
    elif not width[0]:
        return attn.proj.bias.expand(B, N, C), h.new_zeros(B, N)
    else:
        w = block.sliced_weights(*width)
        qkv_w, qkv_b, proj_w, heads = w.qkv_w, w.qkv_b, w.proj_w, len(width[0])
    qkv = F.linear(h, qkv_w, qkv_b).reshape(B, N, 3, heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    weights = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1)
    out = F.linear((weights @ v).transpose(1, 2).reshape(B, N, heads * attn.head_dim), proj_w, attn.proj.bias)
    return out, weights.mean(1).sum(1)


def mlp_on(block, h: torch.Tensor, width=None) -> torch.Tensor:
    """``block``'s MLP on ``h``: all of it, or a DyDiT block's active groups (none: fc2's bias,
    since GELU(0) = 0)."""
    if width is None:
        return block.mlp(h)
    return block.sliced_mlp(h, block.sliced_weights(*width), width[1])


def routed_mlp(block, x: torch.Tensor, shift, scale, width=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ungated MLP output of the tokens ``x`` (B, n, C) and, for a DyDiT block, the tokens its
    router keeps (B, n): the MLP runs on those only, the others get zeros (as the DyDiT adds
    nothing for them)."""
    h = block.mlp_input(x, shift, scale)
    if width is None:
        return mlp_on(block, h), None
    keep = torch.sigmoid(block.token_selection.logits(x)) > 0.5
    out = torch.zeros_like(h)
    out[keep] = mlp_on(block, h[keep], width)
    return out, keep


def neighbourhood_bonus(score: torch.Tensor, bonus: float = NEIGHBOURHOOD_BONUS) -> torch.Tensor:
    """``score`` (B, N) with the best token of every 2x2 neighbourhood of the token grid raised
    by ``bonus`` x its score; unchanged when the grid does not split into 2x2 cells."""
    B, N = score.shape
    side = math.isqrt(N)
    if side * side != N or side % 2:
        return score
    cells = score.view(B, side // 2, 2, side // 2, 2).permute(0, 1, 3, 2, 4).reshape(B, -1, 4)
    best, where = cells.max(-1, keepdim=True)
    cells = cells + torch.zeros_like(cells).scatter_(-1, where, best * bonus)
    return cells.view(B, side // 2, side // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, N)


class ToCa(CachePolicy):
    """Token-wise caching (see the module docstring): full steps every ``interval`` steps, the
    MLP of the top ``fraction`` of tokens recomputed per block in between. ``interval`` 1 is
    the plain model. On a DyDiT (sliced) a block runs its planned heads and groups, and its
    token router picks, among the fresh tokens, those its MLP runs on."""

    def __init__(self, fraction: float, interval: int, staleness_weight: float = STALENESS_WEIGHT):
        super().__init__()
        self.fraction = _check("ToCa fraction", fraction, isinstance(fraction, (int, float))
                               and not isinstance(fraction, bool) and 0 <= fraction <= 1, "in [0, 1]")
        self.interval = _check("ToCa interval", interval, isinstance(interval, int) and not isinstance(interval, bool)
                               and interval >= 1, "a positive integer")
        self.staleness_weight = _check("ToCa staleness weight", staleness_weight,
                                       isinstance(staleness_weight, (int, float)) and staleness_weight >= 0, ">= 0")
        self.reset()

    def __repr__(self) -> str:
        return f"ToCa(fraction={self.fraction}, interval={self.interval})"

    def reset(self) -> None:
        super().reset()
        self._cache: list[dict] = []

    def run(self, executor, x, c, step):
        if self.interval == 1:  # nothing is ever reused: the plain blocks, bit for bit
            return executor.compute_blocks(range(executor.depth), x)
        full = step.index % self.interval == 0 or len(self._cache) != executor.depth
        if full:
            self._cache = [{} for _ in range(executor.depth)]
        for i, block in enumerate(executor.blocks):
            x = self._full(executor, i, block, x) if full else self._partial(executor, i, block, x)
        return x

    def _full(self, executor, i, block, x):
        cache, cfg, width = self._cache[i], executor.model.config, executor.width(i)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = executor.modulation(i)
        attn, received = attention_with_received(block, block.attention_input(x, shift_msa, scale_msa), width)
        x = gated_residual(x, gate_msa, attn)
        mlp, keep = routed_mlp(block, x, shift_mlp, scale_mlp, width)
        B, N = received.shape
        cache.update(attn=attn, mlp=mlp, received=F.normalize(received, dim=1), stale=x.new_zeros(B, N))
        if width is None:
            parts = flops.block_flops(cfg, N)
            executor.charge_block(i, flops.partial_block_flops(cfg, True, N), parts["attn"] + parts["mlp"], N)
        else:
            kept = keep.float().sum(1).mean().item()
            counts = (len(width[0]), len(width[1]), kept)
            parts = flops.dynamic_block_flops(cfg, N, *counts)
            executor.charge_block(i, flops.partial_block_flops(cfg, True, N, counts), parts["attn"] + parts["mlp"],
                                  kept, keep)
        return gated_residual(x, gate_mlp, mlp)

    def _partial(self, executor, i, block, x):
        cache, cfg, width = self._cache[i], executor.model.config, executor.width(i)
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = executor.modulation(i)
        x = gated_residual(x, gate_msa, cache["attn"])
        B, N, C = x.shape
        fresh = int(self.fraction * N)
        cache["stale"] += 1
        keep, kept = x.new_zeros(B, N, dtype=torch.bool), 0.0
        if fresh:
            score = neighbourhood_bonus(cache["received"] + self.staleness_weight * cache["stale"] / self.interval)
            idx = score.topk(fresh, dim=1).indices  # (B, fresh)
            rows = idx.unsqueeze(-1).expand(-1, -1, C)
            out, keep_fresh = routed_mlp(block, x.gather(1, rows), shift_mlp, scale_mlp, width)
            cache["mlp"] = cache["mlp"].scatter(1, rows, out)
            cache["stale"].scatter_(1, idx, 0.0)
            if keep_fresh is not None:
                keep.scatter_(1, idx, keep_fresh)
                kept = keep_fresh.float().sum(1).mean().item()
        if width is None:
            executor.charge_block(i, flops.partial_block_flops(cfg, False, fresh), flops.block_flops(cfg, fresh)["mlp"],
                                  fresh, attention=False)
        else:
            counts = (0, len(width[1]), kept)
            mlp_macs = flops.dynamic_block_flops(cfg, N, *counts)["mlp"]
            executor.charge_block(i, flops.partial_block_flops(cfg, False, fresh, counts), mlp_macs, kept, keep,
                                  attention=False)
        return gated_residual(x, gate_mlp, cache["mlp"])

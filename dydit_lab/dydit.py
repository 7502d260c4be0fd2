"""Dynamic Diffusion Transformer (DyDiT, Zhao et al., ICLR 2025).

A DiT whose blocks carry TDW routers (attention heads and MLP channel groups chosen from the
timestep embedding) and an SDT router (tokens that skip the MLP). Two ways to run it:

* ``masked``: compute the full width and multiply by the gates, like the official release.
  Used in training (gradients flow through the gates) and for comparison.
* ``sliced`` (eval default): compute only what is on. Samples that share a routing pattern
  (in sampling: the whole batch, one t) run together on weights sliced once per pattern and
  cached; the MLP runs only on the gathered kept tokens. Same values as ``masked``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flops as flops_lib
from .models import DiT, DiTBlock, DiTConfig, modulate
from .routers import SDT_INIT_BIAS, TDW_INIT_BIAS, TokenRouter, WidthRouter, init_routers_all_on

EXECUTIONS = ("sliced", "masked")
SLICE_CACHE_SIZE = 16  # routing patterns kept per block (consecutive steps mostly share one)


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


# ---------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------


@dataclass
class _SlicedWeights:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor


class DyDiTBlock(DiTBlock):
    """DiT block with TDW (heads, MLP groups) and SDT (tokens) routers."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        mlp_hidden = int(hidden_size * mlp_ratio)
        if mlp_hidden % num_heads:
            raise ValueError(f"MLP hidden size {mlp_hidden} does not split into {num_heads} groups")
        self.group_size = mlp_hidden // num_heads
        self.attn_rate = WidthRouter(hidden_size, num_heads)
        self.mlp_rate = WidthRouter(hidden_size, num_heads)
        self.token_selection = TokenRouter(hidden_size)
        self._slice_cache: OrderedDict = OrderedDict()

    # -- masked (official-style) ----------------------------------------------------

    def forward_masked(self, x, c, t_emb):
        """Full-width computation multiplied by the gates. Returns (x, heads, groups, tokens)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))
        heads, groups = self.attn_rate(t_emb), self.mlp_rate(t_emb)
        B, N, C = x.shape
        per_head = self.attn.heads(modulate(self.norm1(x), shift_msa, scale_msa))
        per_head = per_head * heads[:, :, None, None]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(per_head.transpose(1, 2).reshape(B, N, C))
        tokens = self.token_selection(x)
        hidden = self.mlp.fc1(modulate(self.norm2(x), shift_mlp, scale_mlp))
        hidden = hidden * groups.repeat_interleave(self.group_size, dim=1).unsqueeze(1)
        mlp_out = self.mlp.fc2(self.mlp.act(hidden))
        x = x + tokens.unsqueeze(-1) * (gate_mlp.unsqueeze(1) * mlp_out)
        return x, heads, groups, tokens

    # -- sliced (really skips) --------------------------------------------------------

    def _weight_versions(self) -> tuple[int, ...]:
        params = (self.attn.qkv.weight, self.attn.qkv.bias, self.attn.proj.weight,
                  self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight)
        return tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)

    def sliced_weights(self, heads: tuple[int, ...], groups: tuple[int, ...]) -> _SlicedWeights:
        """Weights of the active heads and MLP groups, cached per routing pattern."""
        key = (heads, groups, self._weight_versions())
        if key in self._slice_cache:
            self._slice_cache.move_to_end(key)
            return self._slice_cache[key]
        D, hd = self.attn.proj.in_features, self.attn.head_dim
        device = self.attn.qkv.weight.device
        head_ch = torch.tensor([h * hd + d for h in heads for d in range(hd)], device=device)
        qkv_rows = torch.cat([head_ch + i * D for i in range(3)])
        mlp_ch = torch.tensor([g * self.group_size + j for g in groups for j in range(self.group_size)],
                              device=device)
        full = len(heads) == self.num_heads_total and len(groups) == self.num_heads_total
        w = _SlicedWeights(
            qkv_w=self.attn.qkv.weight if full else self.attn.qkv.weight[qkv_rows].contiguous(),
            qkv_b=self.attn.qkv.bias if full else self.attn.qkv.bias[qkv_rows].contiguous(),
            proj_w=self.attn.proj.weight if full else self.attn.proj.weight[:, head_ch].contiguous(),
            fc1_w=self.mlp.fc1.weight if full else self.mlp.fc1.weight[mlp_ch].contiguous(),
            fc1_b=self.mlp.fc1.bias if full else self.mlp.fc1.bias[mlp_ch].contiguous(),
            fc2_w=self.mlp.fc2.weight if full else self.mlp.fc2.weight[:, mlp_ch].contiguous(),
        )
        self._slice_cache[key] = w
        while len(self._slice_cache) > SLICE_CACHE_SIZE:
            self._slice_cache.popitem(last=False)
        return w

    @property
    def num_heads_total(self) -> int:
        return self.attn.num_heads

    def forward_sliced(self, x, c, heads: tuple[int, ...], groups: tuple[int, ...]):
        """Run only ``heads`` and MLP ``groups`` (shared by the whole sub-batch) and the MLP only
        on the tokens the SDT router keeps. Returns (x, token keep mask (B, N) bool)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))
        w = self.sliced_weights(heads, groups)
        B, N, C = x.shape
        hd = self.attn.head_dim
        qkv = F.linear(modulate(self.norm1(x), shift_msa, scale_msa), w.qkv_w, w.qkv_b)
        q, k, v = qkv.reshape(B, N, 3, len(heads), hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, len(heads) * hd)
        x = x + gate_msa.unsqueeze(1) * F.linear(attn, w.proj_w, self.attn.proj.bias)

        # Same threshold as the masked path (sigmoid > 0.5), evaluated once per token.
        keep = torch.sigmoid(self.token_selection.logits(x)) > 0.5
        idx = keep.reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            # Modulating every token is cheap elementwise work; gathering per-token shift/scale
            # and scatter-adding cost more on CPU (many small memory-bound ops). The MLP, the
            # expensive part, runs on the kept tokens only.
            h = modulate(self.norm2(x), shift_mlp, scale_mlp).reshape(B * N, C).index_select(0, idx)
            out = F.linear(self.mlp.act(F.linear(h, w.fc1_w, w.fc1_b)), w.fc2_w, self.mlp.fc2.bias)
            update = torch.zeros(B * N, C, dtype=x.dtype, device=x.device).index_copy_(0, idx, out)
            x = torch.addcmul(x, update.view(B, N, C), gate_mlp.unsqueeze(1))
        return x, keep


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class DyDiT(DiT):
    """DiT with DyDiT's routers: ``model(x, t, y)`` returns the output tensor like a DiT.

    ``model(x, t, y, return_routing=True)`` also returns the :class:`Routing` it used, and
    ``complete_model=True`` skips every gate (the parent DiT on the same weights). In eval
    mode ``execution`` picks ``"sliced"`` (default, really skips) or ``"masked"``; training
    always uses the masked path so the gates get gradients.
    """

    block_class = DyDiTBlock

    def __init__(self, config: DiTConfig, arch: str | None = None):
        super().__init__(config, arch=arch)
        init_routers_all_on([r for b in self.blocks for r in (b.attn_rate, b.mlp_rate)],
                            [b.token_selection for b in self.blocks])
        self._execution = "sliced"

    @classmethod
    def from_dit(cls, dit: DiT, tdw_bias: float = TDW_INIT_BIAS, sdt_bias: float = SDT_INIT_BIAS) -> "DyDiT":
        """Wrap a trained DiT: same weights, every head, group and token on (exact parent).

        ``tdw_bias``/``sdt_bias``: the routers' initial biases (official: 15 and 35)."""
        model = cls(dit.config, arch=dit.arch)
        missing, unexpected = model.load_state_dict(dit.state_dict(), strict=False)
        if unexpected or any(not _is_router_key(k) for k in missing):
            raise ValueError(f"not a DiT state dict: missing {missing}, unexpected {unexpected}")
        init_routers_all_on([r for b in model.blocks for r in (b.attn_rate, b.mlp_rate)],
                            [b.token_selection for b in model.blocks], tdw_bias, sdt_bias)
        return model.to(next(dit.parameters()).device)

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {value!r}")
        self._execution = value

    def router_parameters(self):
        return [p for n, p in self.named_parameters() if _is_router_key(n)]

    def set_gumbel_noise(self, scale: float) -> None:
        """Scale the routers' training-time Gumbel noise (1: the official gates, 0: route as in eval)."""
        if not 0 <= scale <= 1:
            raise ValueError(f"Gumbel noise scale must be in [0, 1], got {scale}")
        for block in self.blocks:
            for router in (block.attn_rate, block.mlp_rate, block.token_selection):
                router.noise_scale = scale

    def clear_slice_cache(self) -> None:
        for block in self.blocks:
            block._slice_cache.clear()

    def forward(self, x, t, y, complete_model: bool = False, return_routing: bool = False):
        tokens, c, t_emb = self.embed(x, t, y)
        routing = None
        if complete_model:
            for block in self.blocks:
                tokens = DiTBlock.forward(block, tokens, c)
        elif self.training or self.execution == "masked":
            tokens, routing = self._forward_masked(tokens, c, t_emb, t)
        else:
            tokens, routing = self._forward_sliced(tokens, c, t_emb, t)
        out = self.unpatchify(self.final_layer(tokens, c))
        return (out, routing) if return_routing else out

    def _forward_masked(self, tokens, c, t_emb, t):
        heads, groups, keep = [], [], []
        for block in self.blocks:
            tokens, h, g, k = block.forward_masked(tokens, c, t_emb)
            heads.append(h), groups.append(g), keep.append(k)
        stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return tokens, Routing(stack(heads), stack(groups), stack(keep), t)

    def width_gates(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TDW gates of every block for these timestep embeddings: (B, depth, H) twice."""
        heads = torch.stack([b.attn_rate(t_emb) for b in self.blocks], dim=1)
        groups = torch.stack([b.mlp_rate(t_emb) for b in self.blocks], dim=1)
        return heads, groups

    def _forward_sliced(self, tokens, c, t_emb, t):
        heads, groups = self.width_gates(t_emb)
        B, N, _ = tokens.shape
        keep = torch.zeros(B, len(self.blocks), N, dtype=torch.bool, device=tokens.device)
        # Samples with the same routing pattern (same t, or t's that route alike) run together.
        patterns, inverse = torch.unique(torch.cat([heads, groups], dim=2).flatten(1) > 0.5,
                                         dim=0, return_inverse=True)
        out = torch.empty_like(tokens)
        for p in range(len(patterns)):
            rows = (inverse == p).nonzero().squeeze(1)
            sub, sub_c = tokens.index_select(0, rows), c.index_select(0, rows)
            first = rows[0]
            for i, block in enumerate(self.blocks):
                active_h = tuple(heads[first, i].nonzero().squeeze(1).tolist())
                active_g = tuple(groups[first, i].nonzero().squeeze(1).tolist())
                sub, k = block.forward_sliced(sub, sub_c, active_h, active_g)
                keep[rows, i] = k
            out[rows] = sub
        return out, Routing(heads, groups, keep.to(tokens.dtype), t)

    def train(self, mode: bool = True):
        # Sliced weights are views/copies of the current parameters: rebuild after training.
        self.clear_slice_cache()
        return super().train(mode)


def _is_router_key(name: str) -> bool:
    return any(part in name for part in ("attn_rate.", "mlp_rate.", "token_selection."))


class RoutingRecorder(nn.Module):
    """Wraps a DyDiT so that every forward (e.g. inside a sampler) records its routing.

    ``records`` holds one detached CPU :class:`Routing` per call; with classifier-free
    guidance each call covers the conditional and the unconditional half of the batch.
    """

    def __init__(self, model: DyDiT, keep_inputs: bool = False):
        super().__init__()
        if not isinstance(model, DyDiT):
            raise TypeError(f"RoutingRecorder needs a DyDiT, got {type(model).__name__}")
        self.model = model
        self.records: list[Routing] = []
        self.keep_inputs = keep_inputs
        self.inputs: list[torch.Tensor] = []  # x_t of every call, with keep_inputs
        self.config, self.num_classes, self.in_channels = model.config, model.num_classes, model.in_channels

    def forward(self, x, t, y):
        out, routing = self.model(x, t, y, return_routing=True)
        if self.keep_inputs:
            self.inputs.append(x.detach().cpu())
        self.records.append(Routing(*(v.detach().cpu() for v in
                                      (routing.heads, routing.groups, routing.tokens, routing.t))))
        return out

    # Guidance is the parent's, computed through this wrapper's forward.
    forward_with_cfg = DiT.forward_with_cfg

"""The DyDiT block: a DiT block with TDW routers (heads, MLP groups) and an SDT router (tokens),
run either masked (full width times gates, as the official release; used in training) or
sliced (only the active heads, groups and kept tokens; same values)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dit import DiTBlock, gated_residual
from .routers import TokenRouter, WidthRouter

SLICE_CACHE_SIZE = 16  # widths kept per block (consecutive steps mostly share one)


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


def _times_gates(values: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``values * gates``, in place when no gradient is recorded (``values`` is always a fresh
    tensor of the block's own): no new buffer of the block's widest tensors in eval."""
    return values * gates if torch.is_grad_enabled() else values.mul_(gates)


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
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        heads, groups = self.attn_rate(t_emb), self.mlp_rate(t_emb)
        B, N, C = x.shape
        per_head = self.attn.heads(self.attention_input(x, shift_msa, scale_msa))
        per_head = _times_gates(per_head, heads[:, :, None, None])
        x = gated_residual(x, gate_msa, self.attn.proj(per_head.transpose(1, 2).reshape(B, N, C)))
        tokens = self.token_selection(x)
        hidden = self.mlp.fc1(self.mlp_input(x, shift_mlp, scale_mlp))
        hidden = _times_gates(hidden, groups.repeat_interleave(self.group_size, dim=1).unsqueeze(1))
        mlp_out = self.mlp.fc2(self.mlp.act(hidden))
        x = gated_residual(x, gate_mlp, _times_gates(mlp_out, tokens.unsqueeze(-1)))
        return x, heads, groups, tokens

    # -- sliced (really skips) --------------------------------------------------------

    def sliced_weights(self, heads: tuple[int, ...], groups: tuple[int, ...]) -> _SlicedWeights:
        """Weights of the active heads and MLP groups, cached per width (the model clears the
        cache whenever a parameter changes)."""
        key = (heads, groups)
        if key in self._slice_cache:
            self._slice_cache.move_to_end(key)
            return self._slice_cache[key]
        D, hd = self.attn.proj.in_features, self.attn.head_dim
        device = self.attn.qkv.weight.device
        head_ch = torch.tensor([h * hd + d for h in heads for d in range(hd)], dtype=torch.long, device=device)
        qkv_rows = torch.cat([head_ch + i * D for i in range(3)])
        mlp_ch = torch.tensor([g * self.group_size + j for g in groups for j in range(self.group_size)],
                              dtype=torch.long, device=device)
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
        # 1. adaLN-Zero, and the weights of this width (cached)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        w = self.sliced_weights(heads, groups)
        # 2. attention on the active heads (none on, 2024 release: proj of zeros is its bias)
        if heads:
            update = self.sliced_attention(self.attention_input(x, shift_msa, scale_msa), w)
        else:
            update = self.attn.proj.bias
        x = gated_residual(x, gate_msa, update)
        # 3. SDT: the tokens that run the MLP
        keep, idx = self.route_tokens(x)
        # 4. MLP on the active groups: every token without a gather, the kept ones gathered, none skipped
        B, N, C = x.shape
        if idx.numel() == B * N:
            x = self.mlp_residual(x, gate_mlp, self.sliced_mlp(self.mlp_input(x, shift_mlp, scale_mlp), w, groups))
        elif idx.numel():
            sample = None if B == 1 else torch.div(idx, N, rounding_mode="floor")  # one sample: no gathers
            h = self.kept_mlp_input(x, idx, sample, shift_mlp, scale_mlp)
            x = self.kept_mlp_residual(x, idx, sample, gate_mlp, self.sliced_mlp(h, w, groups))
        return x, keep

    def sliced_attention(self, h, w: _SlicedWeights):
        """Attention of the heads ``w`` was sliced for, through their part of ``proj``."""
        per_head = self.attn.attend(F.linear(h, w.qkv_w, w.qkv_b))
        return F.linear(per_head.transpose(1, 2).flatten(2), w.proj_w, self.attn.proj.bias)

    def route_tokens(self, x):
        """SDT's keep mask (B, N) bool, with the masked path's threshold (sigmoid > 0.5), and the
        flat indices of the kept tokens (``nonzero``: the block's one host synchronisation)."""
        keep = torch.sigmoid(self.token_selection.logits(x)) > 0.5
        return keep, keep.reshape(-1).nonzero().squeeze(1)

    def kept_mlp_input(self, x, idx, sample, shift, scale):
        """norm2 and modulation of the kept tokens only: rows ``idx`` of the flattened x, each
        with the shift and scale of its ``sample`` (None for a batch of one: no gather, and
        ``LayerNorm.modulated`` folds the modulation into the norm)."""
        rows = x.reshape(-1, x.shape[-1]).index_select(0, idx)
        if sample is None:
            return self.norm2.modulated(rows, shift, scale)
        return torch.addcmul(shift.index_select(0, sample), self.norm2(rows), (1 + scale).index_select(0, sample))

    def kept_mlp_residual(self, x, idx, sample, gate, out):
        """x + gate * out on the kept rows ``idx`` only, added in place (x is this block's own
        tensor, made by the attention's residual; ``out``, the MLP's own, is scaled in place)."""
        B, N, C = x.shape
        row_gate = gate if sample is None else gate.index_select(0, sample)
        return x.reshape(B * N, C).index_add_(0, idx, _times_gates(out, row_gate)).view(B, N, C)

    def sliced_mlp(self, h, w: _SlicedWeights, groups: tuple[int, ...]):
        """The MLP on the active ``groups`` only (``w``: :meth:`sliced_weights` of this width);
        with none (2024 release), GELU(0) = 0 leaves fc2's bias (a tensor of its own, like
        the MLP's output: the residual scales it in place)."""
        if not groups:
            return self.mlp.fc2.bias.expand(*h.shape[:-1], -1).clone()
        return F.linear(self.mlp.act(F.linear(h, w.fc1_w, w.fc1_b)), w.fc2_w, self.mlp.fc2.bias)

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

from .. import flops as flops_lib
from ..diffusion import GaussianDiffusion
from .dit import DiT, DiTBlock, DiTConfig, modulate
from .routers import SDT_INIT_BIAS, TDW_INIT_BIAS, Routing, TokenRouter, WidthRouter, init_routers_all_on

EXECUTIONS = ("sliced", "masked")
SLICE_CACHE_SIZE = 16  # routing patterns kept per block (consecutive steps mostly share one)


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
        if unexpected or any(not is_router_key(k) for k in missing):
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
        return [p for n, p in self.named_parameters() if is_router_key(n)]

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

    def sampling_cost(self, steps: int, method: str = "ddim", device="cpu") -> dict:
        """The routing this DyDiT actually uses over a sampling run (:func:`sampling_flops`),
        plus ``block_flops_fraction`` (attention + MLP only: what fine-tuning constrains to λ)."""
        run = sampling_flops(self, steps=steps, method=method, device=device, progress=False)
        return {k: run[k] for k in ("flops_fraction", "block_flops_fraction")} | {
            "gflops_per_step": run["gflops_per_image_step"]}

    def train(self, mode: bool = True):
        # Sliced weights are views/copies of the current parameters: rebuild after training.
        self.clear_slice_cache()
        return super().train(mode)


def is_router_key(name: str) -> bool:
    """A DyDiT router parameter (TDW width routers or the SDT token router), by state-dict name."""
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


class CompleteModel(nn.Module):
    """A DyDiT with every head, group and token on (its routers bypassed): the control that
    separates what fine-tuning did to the weights from what the routing costs.

    ``from_t`` > 0 bypasses the routers only at timesteps t >= from_t and routes below: it
    shows which noise levels the routing's quality cost comes from.
    """

    def __init__(self, model: DyDiT, from_t: int = 0):
        super().__init__()
        if not isinstance(model, DyDiT):
            raise TypeError(f"CompleteModel needs a DyDiT, got {type(model).__name__}")
        if not 0 <= from_t < 1000:
            raise ValueError(f"from_t must be in [0, 1000), got {from_t}")
        self.model, self.from_t = model, from_t
        self.config, self.num_classes, self.in_channels = model.config, model.num_classes, model.in_channels

    def forward(self, x, t, y):
        complete = t >= self.from_t
        if complete.all() or not complete.any():
            return self.model(x, t, y, complete_model=bool(complete.all()))
        full = self.model(x[complete], t[complete], y[complete], complete_model=True)
        routed = self.model(x[~complete], t[~complete], y[~complete])
        out = full.new_empty((len(x), *full.shape[1:]))
        out[complete], out[~complete] = full, routed
        return out

    def sampling_cost(self, steps: int, method: str = "ddim", device="cpu") -> dict:
        """Steps at t >= from_t cost the static model; the routed ones as in a fully routed run
        (TDW exact, since it depends on t only; SDT keep-rates from that run)."""
        if self.from_t == 0:
            return DiT.sampling_cost(self.model, steps, method, device)
        run = sampling_flops(self.model, steps=steps, method=method, device=device, progress=False)
        fractions = [1.0 if t >= self.from_t else f
                     for t, f in zip(run["per_step_timesteps"], run["per_step_fraction"])]
        fraction = sum(fractions) / len(fractions)
        return {"flops_fraction": fraction, "gflops_per_step": fraction * run["static_gflops"]}


# ---------------------------------------------------------------------------
# Dynamic FLOPs of a real sampling run
# ---------------------------------------------------------------------------


@torch.no_grad()
def sampling_flops(model: DyDiT, steps: int = 50, num_samples: int = 20, method: str = "ddim",
                   cfg_scale: float = 1.0, seed: int = 0, device="cpu", progress: bool = True) -> dict:
    """Run a DyDiT sampling pass and count the MACs its routing actually used.

    Every sample, block and step is counted from its own routing record (active heads,
    MLP groups, kept tokens), with the static parts and the routers charged in full.
    Returns mean GFLOPs per image per step, the fraction of the static model, and the
    per-step means (the schedule a plot wants).
    """
    cfg = model.config
    recorder = RoutingRecorder(model.eval())
    diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps)
    y = (torch.arange(num_samples) % model.num_classes).to(device)
    size = cfg.input_size
    diffusion.sample(recorder, y, (num_samples, model.in_channels, size, size), method=method,
                     cfg_scale=cfg_scale, seed=seed, progress=progress)
    static = flops_lib.analytic_flops(cfg)["total"]
    per_step = [r.macs(cfg).mean().item() for r in recorder.records]
    mean = sum(per_step) / len(per_step)
    # The quantity the fine-tuning loss constrains to lambda (attention + MLP of the blocks).
    block = sum(r.block_flops_fraction(cfg).mean().item() for r in recorder.records) / len(recorder.records)
    return {
        "arch": model.arch, "steps": steps, "num_samples": num_samples, "method": method,
        "cfg_scale": cfg_scale, "gflops_per_image_step": mean / 1e9,
        "static_gflops": static / 1e9, "flops_fraction": mean / static,
        "block_flops_fraction": block,
        "per_step_timesteps": [int(r.t[0]) for r in recorder.records],
        "per_step_fraction": [f / static for f in per_step],
        "per_step_heads": [r.heads.mean().item() for r in recorder.records],
        "per_step_groups": [r.groups.mean().item() for r in recorder.records],
        "per_step_tokens": [r.tokens.mean().item() for r in recorder.records],
    }

"""Dynamic Diffusion Transformer (DyDiT, Zhao et al., ICLR 2025).

A DiT whose blocks carry TDW routers (attention heads and MLP channel groups chosen from the
timestep embedding) and an SDT router (tokens that skip the MLP). Two ways to run it:

* ``masked``: compute the full width and multiply by the gates, like the official release.
  Used in training (gradients flow through the gates) and for comparison.
* ``sliced`` (eval default): compute only what is on. TDW depends on t only, so the widths of
  every block are planned once per distinct timestep (:meth:`DyDiT.plan_timesteps` plans a
  whole sampling run before its first step) and the block loop never asks the device which
  heads are on. Samples whose widths agree run together on weights sliced once per width and
  cached; the MLP runs only on the kept tokens (all of them without a gather, none: skipped),
  which costs one host synchronisation per block for the token count. Same values as ``masked``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import flops as flops_lib
from ..diffusion import GaussianDiffusion
from .dit import DiT, DiTBlock, DiTConfig, ModelWrapper
from .dydit_block import DyDiTBlock
from .routers import SDT_INIT_BIAS, TDW_INIT_BIAS, Routing, init_routers_all_on

EXECUTIONS = ("sliced", "masked")
PLAN_CACHE_SIZE = 4096  # timesteps whose width plan is kept (a 1000-step schedule fits)


@dataclass(frozen=True)
class WidthPlan:
    """The TDW widths of every block at one timestep: active head and MLP-group indices, and
    the same as 0/1 gates (depth, H) on the model's device for the routing record."""

    units: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # per block: (heads, groups)
    heads: torch.Tensor
    groups: torch.Tensor


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
        self._plans: OrderedDict[int, WidthPlan] = OrderedDict()
        self._plans_signature: tuple = ()

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
        """Forget every sliced weight and width plan (they are rebuilt on the next forward)."""
        for block in self.blocks:
            block._slice_cache.clear()
        self._plans.clear()

    def forward(self, x, t, y, complete_model: bool = False, return_routing: bool = False):
        tokens, c, t_emb = self.embed(x, t, y)
        block_c = self.block_conditioning(c, t, y)
        routing = None
        if complete_model:
            for block, cond in zip(self.blocks, block_c):
                tokens = DiTBlock.forward(block, tokens, cond)
        elif self.training or self.execution == "masked":
            tokens, routing = self._forward_masked(tokens, block_c, t_emb, t)
        else:
            tokens, routing = self._forward_sliced(tokens, c, block_c, t)
        out = self.unpatchify(self.final_layer(tokens, c))
        return (out, routing) if return_routing else out

    def _forward_masked(self, tokens, block_c, t_emb, t):
        heads, groups, keep = [], [], []
        for block, c in zip(self.blocks, block_c):
            tokens, h, g, k = block.forward_masked(tokens, c, t_emb)
            heads.append(h), groups.append(g), keep.append(k)
        stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return tokens, Routing(stack(heads), stack(groups), stack(keep), t)

    def width_gates(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TDW gates of every block for these timestep embeddings: (B, depth, H) twice."""
        heads = torch.stack([b.attn_rate(t_emb) for b in self.blocks], dim=1)
        groups = torch.stack([b.mlp_rate(t_emb) for b in self.blocks], dim=1)
        return heads, groups

    # -- sliced execution: widths planned per timestep -----------------------------------

    def _weights_signature(self) -> tuple:
        """Changes whenever a parameter is updated in place, replaced or moved."""
        return tuple((p._version, p.data_ptr()) for p in self.parameters())

    def plan_timesteps(self, timesteps) -> dict[int, WidthPlan]:
        """The width plans of ``timesteps`` (model timesteps, ints), computed in one router pass
        for those not yet planned. A sampler calls it once with its whole schedule, so the
        sampling steps read their widths from the host without a device round-trip."""
        signature = self._weights_signature()
        if signature != self._plans_signature:  # new weights: every plan and slice is stale
            self.clear_slice_cache()
            self._plans_signature = signature
        values = sorted({int(v) for v in timesteps})
        missing = [v for v in values if v not in self._plans]
        if missing:
            device = self.pos_embed.device
            with torch.no_grad():
                t_emb = self.t_embedder(torch.tensor(missing, device=device))
            heads = torch.stack([b.attn_rate.eval_gates(t_emb) for b in self.blocks], dim=1)
            groups = torch.stack([b.mlp_rate.eval_gates(t_emb) for b in self.blocks], dim=1)
            on_heads, on_groups = heads.bool().cpu(), groups.bool().cpu()  # one transfer for all
            for i, v in enumerate(missing):
                units = tuple((tuple(on_heads[i, b].nonzero().squeeze(1).tolist()),
                               tuple(on_groups[i, b].nonzero().squeeze(1).tolist()))
                              for b in range(len(self.blocks)))
                self._plans[v] = WidthPlan(units, heads[i], groups[i])
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return {v: self._plans[v] for v in values}

    def _forward_sliced(self, tokens, c, block_c, t):
        """``block_c``: each block's conditioning (:meth:`block_conditioning`); a batch that
        mixes widths (so timesteps, which a plan never covers) runs on ``c``."""
        t_host = t.detach().cpu()  # free for a sampler's CPU timesteps; one sync for a device tensor
        values = t_host.tolist()
        plans = self.plan_timesteps(values)
        B, N, _ = tokens.shape
        keep = torch.empty(B, len(self.blocks), N, dtype=torch.bool, device=tokens.device)
        # Samples whose widths agree (in sampling: the whole batch) run together.
        by_width: dict[tuple, list[int]] = {}
        for i, v in enumerate(values):
            by_width.setdefault(plans[v].units, []).append(i)
        if len(by_width) == 1:
            units = next(iter(by_width))
            for i, block in enumerate(self.blocks):
                tokens, keep[:, i] = block.forward_sliced(tokens, block_c[i], *units[i])
            out = tokens
        else:
            out = torch.empty_like(tokens)
            for units, members in by_width.items():
                rows = torch.tensor(members, device=tokens.device)
                sub, sub_c = tokens.index_select(0, rows), c.index_select(0, rows)
                for i, block in enumerate(self.blocks):
                    sub, k = block.forward_sliced(sub, sub_c, *units[i])
                    keep[rows, i] = k
                out[rows] = sub
        if len(plans) == 1:
            plan = next(iter(plans.values()))
            heads, groups = plan.heads.expand(B, -1, -1), plan.groups.expand(B, -1, -1)
        else:
            heads = torch.stack([plans[v].heads for v in values])
            groups = torch.stack([plans[v].groups for v in values])
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


class RoutingRecorder(ModelWrapper):
    """Wraps a DyDiT so that every forward (e.g. inside a sampler) records its routing.

    ``records`` holds one detached CPU :class:`Routing` per call; with classifier-free
    guidance each call covers the conditional and the unconditional half of the batch.
    """

    def __init__(self, model: DyDiT, keep_inputs: bool = False):
        if not isinstance(model, DyDiT):
            raise TypeError(f"RoutingRecorder needs a DyDiT, got {type(model).__name__}")
        super().__init__(model)
        self.records: list[Routing] = []
        self.keep_inputs = keep_inputs
        self.inputs: list[torch.Tensor] = []  # x_t of every call, with keep_inputs

    def forward(self, x, t, y):
        out, routing = self.model(x, t, y, return_routing=True)
        if self.keep_inputs:
            self.inputs.append(x.detach().cpu())
        self.records.append(Routing(*(v.detach().cpu() for v in
                                      (routing.heads, routing.groups, routing.tokens, routing.t))))
        return out


class CompleteModel(ModelWrapper):
    """A DyDiT with every head, group and token on (its routers bypassed): the control that
    separates what fine-tuning did to the weights from what the routing costs.

    ``from_t`` > 0 bypasses the routers only at timesteps t >= from_t and routes below: it
    shows which noise levels the routing's quality cost comes from.
    """

    def __init__(self, model: DyDiT, from_t: int = 0):
        if not isinstance(model, DyDiT):
            raise TypeError(f"CompleteModel needs a DyDiT, got {type(model).__name__}")
        if not 0 <= from_t < 1000:
            raise ValueError(f"from_t must be in [0, 1000), got {from_t}")
        super().__init__(model)
        self.from_t = from_t

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

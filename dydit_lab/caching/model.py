"""The executor every caching policy runs on: :class:`CachedModel` wraps a DiT or a DyDiT and
runs its embedding, then the block loop as a policy decides (compute a block, reuse its cached
features, or compute part of it), then the final layer, and records what actually ran.

A computed block of a DiT is the block itself; of a DyDiT in eval mode the block's
``forward_sliced`` with the widths planned for the step's timestep (so the dynamic width still
really skips), or ``forward_masked`` when the DyDiT runs masked. A reused block costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import flops
from ..diffusion import GaussianDiffusion
from ..models.dit import DiT, ModelWrapper
from ..models.dydit import DyDiT
from ..models.routers import Routing


@dataclass(frozen=True)
class Step:
    """Where a call sits in its sampling run: ``index`` 0 is the first (noisiest) step;
    ``num_steps`` is known when the sampler planned its schedule (``plan_timesteps``)."""

    index: int
    num_steps: int | None
    t: int

    @property
    def is_last(self) -> bool:
        return self.num_steps is not None and self.index == self.num_steps - 1


@dataclass
class CallRecord:
    """What one forward ran, per sample (means over the batch): ``computed`` per block (in
    full or in part), ``tokens`` whose MLP ran per block (0: reused), the MACs of the whole
    forward, of the blocks' attention + MLP alone, and of the policy's own work (probes).
    ``routing``: a DyDiT's gates of the computed blocks (a reused block's are all zero)."""

    t: int
    step: int
    batch: int
    computed: list[bool]
    tokens: list[float]
    macs: float
    block_macs: float
    policy_macs: float
    routing: Routing | None = None


class CachedModel(ModelWrapper):
    """``CachedModel(model, policy)``: a DiT or DyDiT sampled with a feature-caching ``policy``
    (see :mod:`dydit_lab.caching.policies`), in place of ``model`` (any sampler, with or
    without guidance: one call per step, caches kept per call).

    A sampling run starts with :meth:`reset`, which the sampler triggers through
    :meth:`plan_timesteps`; without a plan, a timestep not below the previous one, or a new
    batch shape, starts a new run. Every call must carry one timestep for the whole batch.
    ``records`` holds one :class:`CallRecord` per call since the sampler last planned a run;
    :meth:`sampling_cost` runs a sampling pass and returns its exact cost.
    """

    def __init__(self, model: DiT, policy):
        if not isinstance(model, DiT):
            raise TypeError(f"CachedModel needs a DiT or a DyDiT, got {type(model).__name__}")
        super().__init__(model)
        self.policy = policy
        self.records: list[CallRecord] = []
        self._schedule: list[int] | None = None
        self._last: tuple | None = None  # (t, shape) of the previous call
        self._calls = 0
        self._call: dict | None = None
        cfg = model.config  # the static costs, computed once
        self._outside, self._overhead = flops.outside_blocks_flops(cfg), flops.block_overhead_flops(cfg)
        self._static_block = flops.block_flops(cfg, flops.num_tokens(cfg))

    def __repr__(self) -> str:
        return f"CachedModel({type(self.model).__name__} {self.model.arch}, {self.policy})"

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def dynamic(self) -> bool:
        return isinstance(self.model, DyDiT)

    # -- runs -----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every cached feature: the next call is the first step of a new run."""
        self.policy.reset()
        self._calls, self._last = 0, None

    def plan_timesteps(self, timesteps):
        """The sampler's schedule, given once before the first step: starts a new run (and
        plans a DyDiT's widths, as the DyDiT's own method does)."""
        self._schedule = sorted({int(v) for v in timesteps}, reverse=True)
        self.reset()
        self.records = []  # a long-lived model keeps the record of its latest run only
        plan = getattr(self.model, "plan_timesteps", None)
        return plan(timesteps) if callable(plan) else None

    def _step(self, x, t) -> Step:
        values = t.detach().cpu().tolist()
        if len(set(values)) != 1:
            raise ValueError(f"a cached model runs one timestep per call (one sampling step); got {sorted(set(values))}")
        value = int(values[0])
        if self._last is not None and (value >= self._last[0] or tuple(x.shape) != self._last[1]):
            self.reset()  # a new run (or a new batch) cannot reuse the old one's features
        self._last = (value, tuple(x.shape))
        num_steps = len(self._schedule) if self._schedule and value in self._schedule else None
        step = Step(self._calls, num_steps, value)
        self._calls += 1
        return step

    def forward(self, x, t, y):
        step = self._step(x, t)
        tokens, c, t_emb = self.model.embed(x, t, y)
        B, N, _ = tokens.shape
        self._call = {"c": c, "block_c": self.model.block_conditioning(c, t, y), "t_emb": t_emb,
                      "computed": [False] * self.depth,
                      "tokens": [0.0] * self.depth, "block_macs": 0.0, "macs": 0.0, "policy_macs": 0.0,
                      "heads": None, "groups": None, "keep": None}
        if self.dynamic:
            self._prepare_dynamic(B, N, step.t)
        tokens = self.policy.run(self, tokens, c, step)
        out = self.model.unpatchify(self.model.final_layer(tokens, c))
        call, self._call = self._call, None
        routing = None
        if self.dynamic:
            routing = Routing(call["heads"], call["groups"], call["keep"].float(), t.detach().cpu())
        macs = self._outside + call["macs"] + call["policy_macs"]
        self.records.append(CallRecord(step.t, step.index, B, call["computed"], call["tokens"], macs,
                                       call["block_macs"], call["policy_macs"], routing))
        return out

    # -- what policies call -----------------------------------------------------------

    def _prepare_dynamic(self, B, N, t):
        """Empty routing records, and the widths planned for timestep ``t`` (sliced execution)."""
        model = self.model
        H = model.config.num_heads
        self._call.update(heads=torch.zeros(B, self.depth, H), groups=torch.zeros(B, self.depth, H),
                          keep=torch.zeros(B, self.depth, N, dtype=torch.bool))
        if not (model.training or model.execution == "masked"):
            self._call["plan"] = model.plan_timesteps([t])[t]

    def compute_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run block ``i`` in full on ``x`` (a DyDiT: at its planned width, only its kept tokens
        through the MLP) and charge what it cost."""
        call, block, cfg = self._call, self.blocks[i], self.model.config
        if not self.dynamic:
            out = block(x, call["block_c"][i])
            parts = self._static_block
            call["tokens"][i] = float(x.shape[1])
        else:
            plan = call.get("plan")
            if plan is not None:
                out, keep = block.forward_sliced(x, call["block_c"][i], *plan.units[i])
                heads, groups = (g[i].detach().cpu().expand(len(x), -1) for g in (plan.heads, plan.groups))
            else:
                out, heads, groups, keep = block.forward_masked(x, call["block_c"][i], call["t_emb"])
                heads, groups, keep = heads.detach().cpu(), groups.detach().cpu(), keep.detach().cpu() > 0.5
            keep = keep.detach().cpu()
            call["heads"][:, i], call["groups"][:, i], call["keep"][:, i] = heads, groups, keep
            kept = keep.float().sum(1).mean().item()
            # One timestep per call: every sample shares its widths, so the mean count is exact.
            parts = flops.dynamic_block_flops(cfg, x.shape[1], heads[0].sum().item(), groups[0].sum().item(), kept)
            call["tokens"][i] = kept
        call["computed"][i] = True
        call["block_macs"] += parts["attn"] + parts["mlp"]
        call["macs"] += self._overhead + sum(parts.values())
        return out

    def modulation(self, i: int) -> tuple[torch.Tensor, ...]:
        """Block ``i``'s adaLN modulation in this call (planned for the run, or from c)."""
        return self.blocks[i].modulation(self._call["block_c"][i])

    def compute_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        """Run ``blocks`` (indices, in order) in full."""
        for i in blocks:
            x = self.compute_block(i, x)
        return x

    def width(self, i: int):
        """Block ``i``'s (active heads, active MLP groups) at this call's timestep: None for a
        DiT (everything on); a DyDiT must run sliced (eval mode) for a policy to ask."""
        if not self.dynamic:
            return None
        plan = self._call.get("plan")
        if plan is None:
            raise ValueError(f"{self.policy} runs a DyDiT's blocks itself: it needs eval mode and sliced execution")
        return plan.units[i]

    def charge_block(self, i: int, macs: float, block_macs: float, tokens: float, keep=None,
                     attention: bool = True) -> None:
        """Record block ``i`` as run in part by the policy itself (ToCa): its MACs, of which
        ``block_macs`` attention + MLP, and the tokens whose MLP ran (with no attention either:
        not computed). A DyDiT's block also records its gates: its planned heads (when
        ``attention`` ran) and groups, and ``keep`` (B, N), the tokens its MLP ran on."""
        call = self._call
        call["computed"][i], call["tokens"][i] = attention or tokens > 0, float(tokens)
        call["macs"] += macs
        call["block_macs"] += block_macs
        if self.dynamic:
            plan = call["plan"]
            if attention:
                call["heads"][:, i] = plan.heads[i].detach().cpu()
            call["groups"][:, i], call["keep"][:, i] = plan.groups[i].detach().cpu(), keep.detach().cpu()

    def charge(self, macs: float) -> None:
        """Charge the policy's own work in this call (a probe), per sample."""
        self._call["policy_macs"] += macs

    # -- cost -------------------------------------------------------------------------

    @torch.no_grad()
    def sampling_cost(self, steps: int, method: str = "ddim", device="cpu", num_samples: int = 20,
                      seed: int = 0) -> dict:
        """What one sampling step costs per image, from the calls of a real sampling run (as
        :func:`dydit_lab.models.dydit.sampling_flops` runs it): ``gflops_per_step``,
        ``flops_fraction`` of the static model, ``block_flops_fraction`` (attention + MLP
        only) and ``blocks_computed`` (the fraction of block calls that ran)."""
        run = self.sampling_run(steps, method, device, num_samples, seed)
        return {k: run[k] for k in ("gflops_per_step", "flops_fraction", "block_flops_fraction", "blocks_computed")}

    @torch.no_grad()
    def sampling_run(self, steps: int, method: str = "ddim", device="cpu", num_samples: int = 20,
                     seed: int = 0, cfg_scale: float = 1.0) -> dict:
        """:meth:`sampling_cost` with the per-step detail (``per_step_fraction``,
        ``per_step_blocks``, ``per_step_timesteps``) and the run's :class:`CallRecord` list."""
        cfg = self.model.config
        was_training = self.model.training
        self.model.eval()
        diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps)
        y = (torch.arange(num_samples) % self.num_classes).to(device)
        diffusion.sample(self, y, (num_samples, self.in_channels, cfg.input_size, cfg.input_size), method=method,
                         cfg_scale=cfg_scale, seed=seed, progress=False)
        self.model.train(was_training)
        records, self.records = self.records, []
        return summarise(cfg, records)


def summarise(config, records: list[CallRecord]) -> dict:
    """Mean cost per call of ``records`` (one sampling run): the keys of
    :meth:`CachedModel.sampling_cost` plus the per-step detail."""
    if not records:
        raise ValueError("no calls recorded: run the sampler first")
    static = flops.analytic_flops(config)["total"]
    blocks_static = config.depth * sum(flops.block_flops(config, flops.num_tokens(config)).values())
    mean = sum(r.macs for r in records) / len(records)
    return {
        "gflops_per_step": mean / 1e9, "flops_fraction": mean / static,
        "block_flops_fraction": sum(r.block_macs for r in records) / len(records) / blocks_static,
        "blocks_computed": sum(sum(r.computed) for r in records) / (len(records) * config.depth),
        "per_step_timesteps": [r.t for r in records],
        "per_step_fraction": [r.macs / static for r in records],
        "per_step_blocks": [sum(r.computed) for r in records],
        "records": records,
    }

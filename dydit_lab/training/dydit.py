"""FLOPs-constrained fine-tuning of a trained DiT into a DyDiT.

loss = diffusion loss of the dynamic model
     + diffusion loss of the complete model on the same weights (first ``complete_model_steps`` only)
     + flops_weight * (batch-mean FLOPs fraction - target)^2,
with the target held at 1 for ``hold_steps``, then annealed linearly to ``target_ratio`` by
``anneal_steps``, and timesteps stratified over the four quarters of [0, 1000). With
``distill > 0`` the diffusion loss regresses on a mix of the noise and the parent's prediction.

The two stages follow the official release: its first stage co-trains the complete model, its
second trains the dynamic model alone.

``python -m dydit_lab finetune --parent data/checkpoints/DiT-lab-L.pt --target-ratio 0.5 --out runs/dydit-L-0.5``
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, load_model
from ..diffusion import GaussianDiffusion
from ..models.dydit import DyDiT
from ..models.routers import init_routers_all_on
from ..paths import CHECKPOINT_DIR
from .loop import Batch, LoopConfig, Objective, StepResult, run_training, stratified_timesteps


@dataclass
class FinetuneConfig(LoopConfig):
    parent: str = str(CHECKPOINT_DIR / "DiT-lab-L.pt")  # the trained DiT (or DyDiT) to start from
    out: str = "runs/dydit-L"
    target_ratio: float = 0.5  # lambda: FLOPs of the DyDiT / FLOPs of the parent
    steps: int = 1200  # 10 % of DiT-lab-L's pre-training steps
    hold_steps: int = 50  # target = 1 while the routers settle
    anneal_steps: int = 500  # target reaches target_ratio here
    batch_size: int = 64
    router_lr: float = 3e-3  # routers start saturated and must move within a short fine-tune
    tdw_init_bias: float = 15.0  # official value
    sdt_init_bias: float = 5.0  # official 35 suits 200k steps; SDT could not move in ours
    flops_weight: float = 2.0  # w in w * (FLOPs fraction - target)^2
    complete_model_steps: int = 0  # co-train the all-on model for the first N steps (official stage 1; lab: 0)
    noise_off_step: int = 900  # Gumbel noise fades from anneal_steps to 0 here, then gates as in sampling (0: never)
    router_objective: str = "relative"  # relative: routers weigh each t's loss by 1 / the parent's loss there; absolute: official
    model_objective: str = "absolute"  # the DiT weights' loss: absolute: the diffusion loss (official); relative: as the routers
    distill: float = 0.0  # regress on (1 - distill) * noise + distill * the parent's prediction (0: official)
    routers: str = "both"  # both; tdw: width routers only (every token kept); sdt: token routers only (full width)
    ema_decay: float = 0.995  # kept, but export the online weights: an EMA of router weights routes differently
    routing_log_every: int = 50  # per-block widths and token keep-rates to routing.csv every N steps (0: off)
    ckpt_minutes: float = 4.0
    lr: float = 1e-4  # the DiT weights; routers use router_lr


def target_at(step: int, cfg: FinetuneConfig) -> float:
    """FLOPs target: 1.0 while holding, then linear down to ``target_ratio``."""
    if step < cfg.hold_steps:
        return 1.0
    progress = min(1.0, (step - cfg.hold_steps) / max(1, cfg.anneal_steps - cfg.hold_steps))
    return 1.0 - (1.0 - cfg.target_ratio) * progress


def gumbel_noise_at(step: int, cfg: FinetuneConfig) -> float:
    """Router noise scale: 1 until the FLOPs target is reached, then linear to 0 at ``noise_off_step``.

    With noise, a gate is on with probability sigmoid(logit); sampling switches it on whenever
    the logit is positive. Fading the noise makes the last steps train (and constrain the FLOPs
    of) the routing that sampling will use.
    """
    if not cfg.noise_off_step:
        return 1.0
    span = max(1, cfg.noise_off_step - cfg.anneal_steps)
    return min(1.0, max(0.0, (cfg.noise_off_step - step) / span))


PROFILE_BINS = 20


@torch.no_grad()
def loss_profile(model: DyDiT, diffusion: GaussianDiffusion, images, labels, generator: torch.Generator,
                 samples_per_bin: int = 256) -> torch.Tensor:
    """The complete model's mean noise-prediction MSE in each of ``PROFILE_BINS`` equal bins of t."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_bin = diffusion.num_timesteps // PROFILE_BINS
    profile = []
    for b in range(PROFILE_BINS):
        idx = torch.randint(len(images), (samples_per_bin,), generator=generator)
        t = (b * per_bin + torch.randint(per_bin, (samples_per_bin,), generator=generator)).to(device)
        x0 = images[idx].to(device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, t, labels[idx].to(device), complete_model=True)
        profile.append(diffusion.losses_from_output(out, x0, x_t, t, noise)["mse"].mean())
    model.train(was_training)
    return torch.stack(profile)


def relative_weights(t: torch.Tensor, profile: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Per-sample weights mean(profile) / profile[bin of t]: an x % loss increase costs the same at
    every t. The absolute noise-prediction loss at t > 500 is ~100x smaller than at small t, so
    routers that trade FLOPs against it starve the noisy steps, where the digit takes shape."""
    bins = (t * len(profile) // num_timesteps).clamp(max=len(profile) - 1)
    return profile.mean() / profile.to(t.device)[bins]


@torch.no_grad()
def distillation_target(teacher: DyDiT, diffusion: GaussianDiffusion, x_t, t, y, noise,
                        distill: float) -> torch.Tensor:
    """The noise-prediction target mixed with the parent's own prediction.

    MSE to the mix equals (1 - distill) * MSE to the noise + distill * MSE to the parent, up to a
    constant. The parent's prediction is a far less noisy target than the sampled noise (it is
    the parent's estimate of E[noise | x_t]), so a 1,200-step fine-tune spends its gradient on
    recovering what the routing removed rather than on relearning the data.
    """
    eps, _ = diffusion.split_output(teacher(x_t, t, y, complete_model=True), noise.shape[1])
    return (1.0 - distill) * noise + distill * eps


ROUTING_LOG_FIELDS = {
    "block": "block index",
    "heads": "mean fraction of attention heads on",
    "heads_min": "the fewest heads any sample of the batch kept, as a fraction",
    "groups": "mean fraction of MLP groups on",
    "groups_min": "the fewest MLP groups any sample kept, as a fraction",
    "tokens": "mean fraction of tokens through the MLP",
    "tokens_low_t": "same, samples with t < 500 (the clean half)",
    "tokens_high_t": "same, samples with t >= 500 (the noisy half)",
}


def per_block_routing(routing) -> list[dict]:
    """One row per block of a training batch's routing (see ``ROUTING_LOG_FIELDS``): the
    trajectory that tells a collapsing fine-tune (a block down to one head, token routers
    stuck at all or nothing) from a healthy one."""
    heads, groups = routing.heads.detach().float().mean(-1), routing.groups.detach().float().mean(-1)
    tokens = routing.tokens.detach().float().mean(-1)  # each (B, depth)
    low = routing.t < 500

    def mean_of(mask):
        return tokens[mask].mean(0) if mask.any() else torch.full_like(tokens[0], float("nan"))

    columns = {"heads": heads.mean(0), "heads_min": heads.min(0).values, "groups": groups.mean(0),
               "groups_min": groups.min(0).values, "tokens": tokens.mean(0),
               "tokens_low_t": mean_of(low), "tokens_high_t": mean_of(~low)}
    columns = {k: v.cpu().tolist() for k, v in columns.items()}
    return [{"block": b, **{k: f"{v[b]:.4f}" for k, v in columns.items()}} for b in range(tokens.shape[1])]


class DyDiTObjective(Objective):
    """Diffusion loss of the routed model + the FLOPs penalty. ``router_objective`` and
    ``model_objective`` pick each parameter group's loss (absolute or relative per t)."""

    log_fields = ["complete_loss", "flops_fraction", "target", "gumbel_noise", "heads", "groups", "tokens"]
    detail_name, detail_fields = "routing", list(ROUTING_LOG_FIELDS)

    def __init__(self, cfg: FinetuneConfig):
        check_finetune_config(cfg)
        self.cfg = cfg
        self.name = f"finetune lambda={cfg.target_ratio}"
        self.teacher = self.profile = self.router_params = None

    def build(self, device):
        parent = load_parent(self.cfg.parent)
        if not isinstance(parent, DyDiT):
            parent = DyDiT.from_dit(parent, tdw_bias=self.cfg.tdw_init_bias, sdt_bias=self.cfg.sdt_init_bias)
        model = parent.to(device)
        freeze_routers(model, self.cfg.routers)
        # Copied before the checkpoint is restored: on --resume too, the teacher is the parent.
        if self.cfg.distill:
            self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        return model

    def param_groups(self, model):
        self.router_params = [p for p in model.router_parameters() if p.requires_grad]
        routers = set(map(id, self.router_params))
        return [
            {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in routers],
             "lr": self.cfg.lr},
            {"params": self.router_params, "lr": self.cfg.router_lr},
        ]

    def prepare(self, model, diffusion, images, labels):
        self.model = model
        if "relative" in (self.cfg.router_objective, self.cfg.model_objective):  # on the parent, before any step (and on resume)
            self.profile = loss_profile(model, diffusion, images, labels, torch.Generator().manual_seed(self.cfg.seed))

    def timesteps(self, batch, num_timesteps, generator):
        return stratified_timesteps(batch, num_timesteps, generator)

    def loss(self, forward, diffusion, batch: Batch) -> StepResult:
        cfg, model = self.cfg, self.model
        x_t = diffusion.q_sample(batch.x0, batch.t, batch.noise)
        target_eps = (batch.noise if self.teacher is None else
                      distillation_target(self.teacher, diffusion, x_t, batch.t, batch.y, batch.noise, cfg.distill))
        noise_scale = gumbel_noise_at(batch.step, cfg)
        model.set_gumbel_noise(noise_scale)
        out, routing = forward(x_t, batch.t, batch.y, return_routing=True)
        terms = diffusion.losses_from_output(out, batch.x0, x_t, batch.t, target_eps, batch.weights)
        objectives = {"absolute": terms["loss"].mean()}
        if self.profile is not None:
            objectives["relative"] = (terms["mse"] * relative_weights(batch.t, self.profile, diffusion.num_timesteps)
                                      + terms.get("vb", 0.0)).mean()
        dynamic = objectives[cfg.model_objective]
        fraction = routing.block_flops_fraction(model.config).mean()
        target = target_at(batch.step, cfg)
        flops_penalty = cfg.flops_weight * (fraction - target) ** 2
        loss = dynamic + flops_penalty
        complete = torch.zeros(())
        if batch.step < cfg.complete_model_steps:
            out_full = forward(x_t, batch.t, batch.y, complete_model=True)
            complete = diffusion.losses_from_output(out_full, batch.x0, x_t, batch.t, batch.noise,
                                                    batch.weights)["loss"].mean()
            loss = loss + complete
        override = None
        if cfg.router_objective != cfg.model_objective:  # the routers' own objective
            override = (self.router_params, objectives[cfg.router_objective] + flops_penalty)
        log = {"loss": objectives["absolute"].item(), "complete_loss": complete.item(), "flops_fraction": fraction.item(),
               "target": target, "gumbel_noise": noise_scale, "heads": routing.heads.mean().item(),
               "groups": routing.groups.mean().item(), "tokens": routing.tokens.mean().item()}
        due = cfg.routing_log_every and (batch.step + 1) % cfg.routing_log_every == 0
        return StepResult(loss, log, override, detail=per_block_routing(routing) if due else None)


def freeze_routers(model: DyDiT, which: str) -> None:
    """For the TDW-only / SDT-only ablations: the other kind of router is set all-on (the
    official init biases) and frozen, so the FLOPs target is met by the trained kind alone."""
    if which == "both":
        return
    width = [r for block in model.blocks for r in (block.attn_rate, block.mlp_rate)]
    tokens = [block.token_selection for block in model.blocks]
    frozen_width, frozen_tokens = (width, []) if which == "sdt" else ([], tokens)
    init_routers_all_on(frozen_width, frozen_tokens)
    for router in frozen_width + frozen_tokens:
        router.requires_grad_(False)


def check_finetune_config(cfg: FinetuneConfig) -> None:
    if cfg.routers not in ("both", "tdw", "sdt"):
        raise ValueError(f"routers must be both, tdw or sdt, got {cfg.routers!r}")
    if not 0 < cfg.target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {cfg.target_ratio}")
    for name in ("router_objective", "model_objective"):
        if getattr(cfg, name) not in ("relative", "absolute"):
            raise ValueError(f"{name} must be relative or absolute, got {getattr(cfg, name)!r}")
    if not 0 <= cfg.distill <= 1:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill}")
    if cfg.noise_off_step and not cfg.anneal_steps < cfg.noise_off_step <= cfg.steps:
        raise ValueError(f"noise_off_step must be 0 or in (anneal_steps, steps], got {cfg.noise_off_step}")


def load_parent(path):
    """The model a fine-tune starts from; a file that is no DiT is named in the error."""
    try:
        return load_model(path)
    except CheckpointError as err:
        raise CheckpointError(f"--parent {path} is not a DiT checkpoint: {err}") from err


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune a DiT into a DyDiT (or resume) and return the checkpoint path."""
    return run_training(cfg, DyDiTObjective(cfg))

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
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import load_model
from .data import load_dataset
from .diffusion import GaussianDiffusion, min_snr_weights
from .dydit import DyDiT
from .training import append_log, atomic_save, optimizer_step, resolve_device, restore_or_refuse

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class FinetuneConfig:
    parent: str = "data/checkpoints/DiT-lab-L.pt"  # the trained DiT (or DyDiT) to start from
    out: str = "runs/dydit-L"
    target_ratio: float = 0.5  # lambda: FLOPs of the DyDiT / FLOPs of the parent
    steps: int = 1200  # 10 % of DiT-lab-L's pre-training steps
    hold_steps: int = 50  # target = 1 while the routers settle
    anneal_steps: int = 500  # target reaches target_ratio here
    batch_size: int = 64
    lr: float = 1e-4
    router_lr: float = 3e-3  # routers start saturated and must move within a short fine-tune
    tdw_init_bias: float = 15.0  # official value
    sdt_init_bias: float = 5.0  # official 35 suits 200k steps; SDT could not move in ours
    flops_weight: float = 2.0  # w in w * (FLOPs fraction - target)^2
    complete_model_steps: int = 0  # co-train the all-on model for the first N steps (official stage 1; lab: 0)
    noise_off_step: int = 900  # Gumbel noise fades from anneal_steps to 0 here, then gates as in sampling (0: never)
    router_objective: str = "relative"  # relative: routers weigh each t's loss by 1 / the parent's loss there; absolute: official
    distill: float = 0.0  # regress on (1 - distill) * noise + distill * the parent's prediction (0: official)
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995  # kept, but export the online weights: an EMA of router weights routes differently
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_minutes: float = 4.0
    device: str = "auto"
    resume: bool = False  # go on from OUT/checkpoint.pt


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
    per_bin = diffusion.num_timesteps // PROFILE_BINS
    profile = []
    for b in range(PROFILE_BINS):
        idx = torch.randint(len(images), (samples_per_bin,), generator=generator).to(images.device)
        t = (b * per_bin + torch.randint(per_bin, (samples_per_bin,), generator=generator)).to(images.device)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator).to(images.device)
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, t, labels[idx], complete_model=True)
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


def stratified_timesteps(batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Equal shares of the batch from each quarter of [0, T), so every noise level is present."""
    quarter = num_timesteps // 4
    offsets = (torch.arange(batch) % 4) * quarter
    return offsets + torch.randint(quarter, (batch,), generator=generator)


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune (or resume) and return the checkpoint path."""
    if not 0 < cfg.target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {cfg.target_ratio}")
    if cfg.router_objective not in ("relative", "absolute"):
        raise ValueError(f"router_objective must be relative or absolute, got {cfg.router_objective!r}")
    if not 0 <= cfg.distill <= 1:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill}")
    if cfg.noise_off_step and not cfg.anneal_steps < cfg.noise_off_step <= cfg.steps:
        raise ValueError(f"noise_off_step must be 0 or in (anneal_steps, steps], got {cfg.noise_off_step}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    parent = load_model(cfg.parent)
    if not isinstance(parent, DyDiT):
        parent = DyDiT.from_dit(parent, tdw_bias=cfg.tdw_init_bias, sdt_bias=cfg.sdt_init_bias)
    model = parent.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # Copied before the checkpoint is restored: on --resume too, the teacher is the parent.
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if cfg.distill else None
    router_params = model.router_parameters()
    routers = set(map(id, router_params))
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in routers], "lr": cfg.lr},
        {"params": router_params, "lr": cfg.router_lr},
    ], weight_decay=0.0)
    images, labels = (x.to(device) for x in load_dataset("mnist", "train").tensors)
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    profile = None
    if cfg.router_objective == "relative":  # measured on the parent, before any step (and again on resume)
        profile = loss_profile(model, diffusion, images, labels, torch.Generator().manual_seed(cfg.seed))
    step = restore_or_refuse(ckpt_path, cfg.resume, model, ema, opt, device)

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step * 7919)
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"finetune lambda={cfg.target_ratio}")
    last_save = time.time()
    while step < cfg.steps:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx]
        t = stratified_timesteps(cfg.batch_size, diffusion.num_timesteps, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        weights = (min_snr_weights(diffusion.alphas_cumprod, t.cpu(), cfg.min_snr_gamma).float().to(device)
                   if cfg.min_snr_gamma > 0 else None)
        x_t = diffusion.q_sample(x0, t, noise)
        target_eps = (noise if teacher is None
                      else distillation_target(teacher, diffusion, x_t, t, y, noise, cfg.distill))
        noise_scale = gumbel_noise_at(step, cfg)
        model.set_gumbel_noise(noise_scale)
        out_dyn, routing = model(x_t, t, y, return_routing=True)
        terms = diffusion.losses_from_output(out_dyn, x0, x_t, t, target_eps, weights)
        dyn = terms["loss"].mean()
        fraction = routing.block_flops_fraction(model.config).mean()
        target = target_at(step, cfg)
        flops_penalty = cfg.flops_weight * (fraction - target) ** 2
        loss = dyn + flops_penalty
        complete = torch.zeros(())
        if step < cfg.complete_model_steps:
            out_full = model(x_t, t, y, complete_model=True)
            complete = diffusion.losses_from_output(out_full, x0, x_t, t, noise, weights)["loss"].mean()
            loss = loss + complete
        router_loss = None
        if profile is not None:  # the routers' own objective; the weights keep the diffusion loss
            relative = terms["mse"] * relative_weights(t, profile, diffusion.num_timesteps) + terms.get("vb", 0.0)
            router_loss = (router_params, relative.mean() + flops_penalty)
        optimizer_step(loss, model.parameters(), opt, cfg.grad_clip, ema, model, cfg.ema_decay,
                       override=router_loss)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{dyn.item():.4f}", flops=f"{fraction.item():.3f}", target=f"{target:.3f}")
        append_log(out / "log.csv", {
            "step": step, "loss": dyn.item(), "complete_loss": complete.item(),
            "flops_fraction": fraction.item(), "target": target, "gumbel_noise": noise_scale,
            "heads": routing.heads.mean().item(), "groups": routing.groups.mean().item(),
            "tokens": routing.tokens.mean().item()})
        if time.time() - last_save > 60 * cfg.ckpt_minutes or step == cfg.steps:
            save(ckpt_path, model, ema, opt, cfg, step)
            last_save = time.time()
    bar.close()
    return ckpt_path


def save(path, model, ema, opt, cfg: FinetuneConfig, step: int) -> None:
    args = dataclasses.asdict(cfg) | {"arch": model.arch, "model_config": dataclasses.asdict(model.config),
                                      "kind": "dydit"}
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "args": args, "step": step}, path)

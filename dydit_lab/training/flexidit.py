"""Fine-tuning a DiT into a FlexiDiT (extra coarse patch sizes sharing every transformer weight).

Each step draws one patch size for the batch (coarse with probability ``p_coarse``), then
timesteps, noise and the min-SNR-weighted eps loss as in pre-training; the parent's weights
train at ``lr``, the new layers (with ``lora_rank`` > 0 also coarse-only adapters) at ``new_lr``;
``train="new"`` freezes the transformer. An optional L2 term pulls coarse predictions towards
the frozen parent's native ones (the paper's distillation, Sec. 3.2).

``python -m dydit_lab flexi-finetune --parent data/checkpoints/DiT-lab-L.pt --out runs/flexi-L``
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion import NUM_TIMESTEPS
from ..models.flexidit import FlexiDiT
from ..paths import CHECKPOINT_DIR
from .dydit import load_parent
from .loop import Batch, LoopConfig, Objective, StepResult, run_training, stratified_timesteps


@dataclass
class FlexiFinetuneConfig(LoopConfig):
    """Options of :func:`flexi_finetune` (each is a ``--flag`` of ``flexi-finetune``)."""

    parent: str = str(CHECKPOINT_DIR / "DiT-lab-L.pt")  # the trained DiT to flexify
    out: str = "runs/flexi-L"
    coarse_patch: int = 0  # 0: 2 x the parent's patch
    p_coarse: float = 0.5  # probability that a batch runs at the coarse patch
    steps: int = 1200  # 10 % of DiT-lab-L's pre-training, the same budget as a DyDiT fine-tune
    batch_size: int = 64
    lr: float = 1e-4  # shared (parent) weights
    new_lr: float = 1e-3  # the new embedding / de-embedding layers start from a resize
    train: str = "all"  # all: every weight; new: only the new layers (transformer frozen, every batch coarse)
    lora_rank: int = 0  # > 0: coarse-only adapters on every block's attention + MLP (new layers, at new_lr)
    resize: str = "bilinear"  # PI-resize operator: bilinear (FlexiViT) or nearest
    pos: str = "center"  # coarse positions: center (sin-cos at patch centres) or grid
    uniform_timesteps: bool = False  # default: stratified over four equal bands
    coarse_t_min: int = 0  # coarse batches draw t in [coarse_t_min, 1000) (paper, App. B.4: all t)
    distill_weight: float = 0.0  # + w * |coarse eps - frozen parent's native eps|^2
    ema_decay: float = 0.995
    ckpt_minutes: float = 4.0


def check_flexi_config(cfg: FlexiFinetuneConfig) -> None:
    if not 0 <= cfg.p_coarse <= 1:
        raise ValueError(f"p_coarse must lie in [0, 1], got {cfg.p_coarse}")
    if cfg.train not in ("all", "new"):
        raise ValueError(f"train must be 'all' or 'new', got {cfg.train!r}")
    if not 0 <= cfg.coarse_t_min < NUM_TIMESTEPS:
        raise ValueError(f"coarse_t_min must lie in [0, {NUM_TIMESTEPS}), got {cfg.coarse_t_min}")
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {cfg.lora_rank}")
    if cfg.distill_weight < 0:
        raise ValueError(f"distill_weight must be >= 0, got {cfg.distill_weight}")


class FlexiObjective(Objective):
    """The diffusion loss at the step's patch size, plus the optional distillation term."""

    log_fields = ["patch", "distill"]
    find_unused_parameters = True  # a native batch leaves the coarse layers unused

    def __init__(self, cfg: FlexiFinetuneConfig):
        check_flexi_config(cfg)
        self.cfg, self.teacher, self.coarse = cfg, None, False
        # With the transformer frozen a native batch has nothing to train: every batch is coarse.
        self.p_coarse = 1.0 if cfg.train == "new" else cfg.p_coarse

    def build(self, device):
        parent = load_parent(self.cfg.parent)
        if self.cfg.distill_weight > 0:
            self.teacher = copy.deepcopy(parent).requires_grad_(False).eval().to(device)
        if isinstance(parent, FlexiDiT) and parent.lora_rank != self.cfg.lora_rank:
            raise ValueError(f"--parent is a FlexiDiT with adapters of rank {parent.lora_rank}, "
                             f"but lora_rank is {self.cfg.lora_rank}")
        model = parent if isinstance(parent, FlexiDiT) else FlexiDiT.from_dit(
            parent, coarse_patch=self.cfg.coarse_patch or None, resize=self.cfg.resize, pos=self.cfg.pos,
            lora_rank=self.cfg.lora_rank)
        self.model = model.to(device)
        self.q = model.coarse_patches[0] if not self.cfg.coarse_patch else model._resolve_patch(self.cfg.coarse_patch)
        self.name = f"flexi-finetune p={model.patch_size}/{self.q}"
        return self.model

    def param_groups(self, model):
        new = model.new_parameters()
        new_ids = set(map(id, new))
        shared = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
        if self.cfg.train == "new":
            for p in shared:
                p.requires_grad_(False)
            return [{"params": new, "lr": self.cfg.new_lr}]
        return [{"params": shared, "lr": self.cfg.lr}, {"params": new, "lr": self.cfg.new_lr}]

    def begin_step(self, generator):
        self.coarse = bool(torch.rand((), generator=generator) < self.p_coarse)

    def timesteps(self, batch, num_timesteps, generator):
        """[coarse_t_min, T) for coarse batches, [0, T) otherwise: four equal bands, or uniform."""
        low = self.cfg.coarse_t_min if self.coarse else 0
        if self.cfg.uniform_timesteps or num_timesteps - low < 4:
            return low + torch.randint(num_timesteps - low, (batch,), generator=generator)
        return stratified_timesteps(batch, num_timesteps, generator, low=low)

    def loss(self, forward, diffusion, batch: Batch) -> StepResult:
        patch = self.q if self.coarse else self.model.patch_size
        x_t = diffusion.q_sample(batch.x0, batch.t, batch.noise)
        output = forward(x_t, batch.t, batch.y, patch_size=patch)
        diff = diffusion.losses_from_output(output, batch.x0, x_t, batch.t, batch.noise, batch.weights)["loss"].mean()
        loss, distill = diff, torch.zeros(())
        if self.teacher is not None and self.coarse:
            channels = self.model.in_channels
            with torch.no_grad():
                target = self.teacher(x_t, batch.t, batch.y)[:, :channels]
            distill = ((output[:, :channels] - target) ** 2).mean()
            loss = loss + self.cfg.distill_weight * distill
        return StepResult(loss, {"loss": diff.item(), "patch": patch, "distill": distill.item()})

    def checkpoint_extra(self, model):
        return {"coarse_patches": list(model.coarse_patches), "resize": model.resize, "pos": model.pos,
                "lora_rank": model.lora_rank}


def flexi_finetune(cfg: FlexiFinetuneConfig) -> Path:
    """Fine-tune a DiT into a FlexiDiT (or resume a run) and return the checkpoint path."""
    return run_training(cfg, FlexiObjective(cfg))

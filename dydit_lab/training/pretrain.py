"""Pre-training a DiT: uniform timesteps, min-SNR-weighted eps loss (plus the VB term when
sigma is learned), on the one loop of :mod:`dydit_lab.training.loop`.

``python -m dydit_lab train --arch DiT-lab-L --out runs/lab-L`` (``--resume`` to go on), or
``torchrun --nproc_per_node=N -m dydit_lab train ...`` for data-parallel training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import load_model
from ..models.dit import DiT, create_model
from .loop import Batch, LoopConfig, Objective, StepResult, run_training


@dataclass
class TrainConfig(LoopConfig):
    arch: str = "DiT-lab-L"  # a preset of dydit_lab.models (DiT-S/2 ... DiT-XL/8, DiT-lab-S/L/T)
    out: str = "runs/lab-L"  # run folder: checkpoint.pt, log.csv, config.txt
    steps: int = 12000
    warmup_steps: int = 200  # linear lr warm-up over the first N steps
    init_from: str = ""  # start from this checkpoint's weights (e.g. a parent, for a fine-tune without routers)


class PretrainObjective(Objective):
    """The DiT's own diffusion loss, every parameter at one lr."""

    log_fields: list[str] = []

    def __init__(self, cfg: TrainConfig, model: DiT | None = None):
        self.cfg, self.model = cfg, model
        self.name = f"train {cfg.arch}"

    def build(self, device):
        if self.cfg.init_from:
            model = load_model(self.cfg.init_from)
            if type(model) is not DiT or model.arch != self.cfg.arch:
                raise ValueError(f"--init-from {self.cfg.init_from} holds a {type(model).__name__} "
                                 f"{model.arch}, not a {self.cfg.arch} DiT")
            return model.to(device)
        return (self.model or create_model(self.cfg.arch)).to(device)

    def param_groups(self, model):
        return [{"params": list(model.parameters()), "lr": self.cfg.lr}]

    def loss(self, forward, diffusion, batch: Batch) -> StepResult:
        terms = diffusion.training_losses(forward, batch.x0, batch.t, batch.y, batch.noise, batch.weights)
        return StepResult(terms["loss"].mean(), {})


def train(cfg: TrainConfig, model: DiT | None = None) -> Path:
    """Train (or resume) a DiT and return the path of its checkpoint."""
    return run_training(cfg, PretrainObjective(cfg, model))

"""The one training loop: seeding, AdamW, EMA, resume, DDP, logging and checkpoint cadence.

Every model family (pre-training a DiT, fine-tuning a DyDiT or a FlexiDiT) brings an
:class:`Objective`: its model, optimizer groups, timesteps and loss. :func:`run_training` does
the rest the same way for all of them, under ``torchrun`` too (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import copy
import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..checkpoints import save_training_checkpoint
from ..data import load_dataset
from ..diffusion import GaussianDiffusion, min_snr_weights
from ..evaluation.metrics import SampleEvaluator
from ..paths import CHECKPOINT_NAME, resolve_device


@dataclass
class LoopConfig:
    """Options every training run has (each is a ``--flag`` of its command)."""

    out: str = "runs/run"  # run folder: checkpoint.pt, log.csv, config.txt
    data: str = "mnist"  # mnist, a folder of images with one sub-folder per class, or of latents (extract-latents)
    steps: int = 12000
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 1e-3  # AdamW peak lr, reached after the linear warm-up
    warmup_steps: int = 0  # linear lr warm-up over the first N steps
    decay_steps: int = 0  # linear decay to 0 over the last N steps (0: constant lr after warm-up)
    weight_decay: float = 0.0
    ema_decay: float = 0.9995  # an EMA of the weights rides along (export picks EMA or online)
    min_snr_gamma: float = 5.0  # 0 disables the min-SNR weighting
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 500  # steps between checkpoints ...
    ckpt_minutes: float = 5.0  # ... or minutes, whichever comes first
    eval_every: int = 0  # steps between sample-quality evaluations of the EMA (0: never)
    eval_samples: int = 500
    device: str = "auto"  # auto: CUDA when present, else CPU
    precision: str = "fp32"  # or bf16 (autocast)
    compile: bool = False
    resume: bool = False  # go on from OUT/checkpoint.pt (model, EMA, optimizer, step)


@dataclass
class Batch:
    """One training batch: clean images, labels, timesteps, noise and min-SNR weights."""

    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    weights: torch.Tensor | None
    step: int


@dataclass
class StepResult:
    """What an objective returns for one batch.

    ``override = (params, loss)`` gives those parameters the gradient of that loss instead of
    ``loss`` (DyDiT's routers have their own objective). ``detail`` rows go to the run folder's
    ``<objective.detail_name>.csv`` with ``objective.detail_fields`` (after ``step``).
    """

    loss: torch.Tensor
    log: dict
    override: tuple | None = None
    detail: list[dict] | None = None  # rows for the objective's detail log (e.g. per block), when due


class Objective:
    """What a model family brings to the loop. Subclasses set ``name`` and ``log_fields``."""

    name = "train"
    log_fields: list[str] = []
    detail_name, detail_fields = "", []  # a second CSV log (see StepResult.detail)
    find_unused_parameters = False  # DDP: some batches leave parameters unused (FlexiDiT)

    def build(self, device: torch.device) -> torch.nn.Module:
        """The model to train, on ``device``."""
        raise NotImplementedError

    def param_groups(self, model) -> list[dict]:
        """AdamW parameter groups, each with its base ``lr``."""
        raise NotImplementedError

    def prepare(self, model, diffusion: GaussianDiffusion, images, labels) -> None:
        """Once, after the model is built and before the checkpoint is restored."""

    def begin_step(self, generator: torch.Generator) -> None:
        """Draw per-step choices (e.g. FlexiDiT's patch size) before the batch is drawn."""

    def timesteps(self, batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform over [0, T) unless the family stratifies."""
        return torch.randint(num_timesteps, (batch,), generator=generator)

    def loss(self, forward, diffusion: GaussianDiffusion, batch: Batch) -> StepResult:
        raise NotImplementedError

    def checkpoint_extra(self, model) -> dict:
        """Extra ``args`` entries the checkpoint needs to rebuild the model."""
        return {}


def stratified_timesteps(batch: int, num_timesteps: int, generator: torch.Generator,
                         low: int = 0) -> torch.Tensor:
    """Equal shares of the batch from four equal bands of [low, T), so every noise level is present."""
    band = (num_timesteps - low) // 4
    offsets = (torch.arange(batch) % 4) * band
    return low + offsets + torch.randint(band, (batch,), generator=generator)


# ---------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:  # a frozen weight stays bit-exact (decay * p + (1 - decay) * p need not round to p)
            e.copy_(p.detach())


def optimizer_step(result: StepResult, params, opt, grad_clip: float, world: int = 1) -> None:
    """Backward (with the override's own gradients), clipping and the optimizer step."""
    opt.zero_grad(set_to_none=True)
    if result.override is not None:
        own_params, own_loss = result.override
        own_grads = torch.autograd.grad(own_loss, own_params, retain_graph=True, allow_unused=True)
    result.loss.backward()  # under DDP this all-reduces the ordinary gradients
    if result.override is not None:
        for p, g in zip(own_params, own_grads):
            if g is not None and world > 1:  # autograd.grad bypasses DDP's hooks: average here
                dist.all_reduce(g)
                g /= world
            p.grad = g
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def append_log(path: Path, row: dict, fields: list[str]) -> None:
    """Append one row to a CSV log; a new file gets ``fields`` as header, an existing one keeps
    its own (a run resumed after the columns changed stays aligned). Floats with 5 decimals."""
    if path.exists():
        with open(path, newline="") as f:
            fields = next(csv.reader(f), fields)
        new = False
    else:
        new = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()})


def drop_log_rows_after(path: Path, step: int) -> None:
    """Remove log rows past ``step``: a run killed between checkpoints logged steps that the
    resumed run repeats, and the log must hold each step once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def restore_or_refuse(ckpt_path: Path, resume: bool, model, ema, opt, device="cpu") -> int:
    """With ``resume``, load model, EMA and optimizer from ``ckpt_path`` and return its step;
    without, refuse to overwrite an existing run. Returns 0 for a fresh run."""
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        for log in ckpt_path.parent.glob("*.csv"):
            drop_log_rows_after(log, state["step"])
        return state["step"]
    if ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or pick another --out")
    return 0


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up, constant, then (if ``decay_steps``) a linear cool-down towards 0."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cooldown = min(1.0, (cfg.steps - step) / cfg.decay_steps) if cfg.decay_steps else 1.0
    return warmup * max(0.0, cooldown)


def check_loop_config(cfg: LoopConfig, world: int) -> None:
    if cfg.steps < 1:
        raise ValueError(f"steps must be positive, got {cfg.steps}")
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be positive and divisible by {world} processes")
    if not 0 <= cfg.decay_steps <= cfg.steps:
        raise ValueError(f"decay_steps must be in [0, steps={cfg.steps}], got {cfg.decay_steps}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")


def load_training_data(cfg: LoopConfig, model, device):
    """Images and labels, kept on the host in their stored dtype (a latent set of ImageNet does
    not fit a GPU next to the model): MNIST's train split, an image folder at the model's size,
    or a latent folder. Batches go to the device as they are drawn."""
    dataset = (load_dataset(cfg.data, "train") if cfg.data == "mnist" else
               load_dataset(cfg.data, image_size=model.config.input_size, channels=model.in_channels))
    images, labels = dataset.tensors
    if images.shape[1:] != (model.in_channels, model.config.input_size, model.config.input_size):
        raise ValueError(f"--data {cfg.data} gives images of shape {tuple(images.shape[1:])}; the model "
                         f"takes ({model.in_channels}, {model.config.input_size}, {model.config.input_size})")
    return images, labels


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def run_training(cfg: LoopConfig, objective: Objective) -> Path:
    """Train (or resume) ``objective``'s model and return the path of the checkpoint."""
    device = resolve_device(cfg.device)
    rank, world = setup_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    check_loop_config(cfg, world)
    main = rank == 0
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME

    # 1. Model, EMA, optimizer, data; then the checkpoint, if resuming.
    model = objective.build(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    groups = objective.param_groups(model)
    base_lrs = [group["lr"] for group in groups]  # kept here: a restored optimizer overwrites its groups
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    images, labels = load_training_data(cfg, model, device)
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    objective.prepare(model, diffusion, images, labels)
    step = restore_or_refuse(ckpt_path, cfg.resume, model, ema, opt, device)

    # 2. Distribution, compilation and the per-rank data stream.
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=objective.find_unused_parameters)
    if cfg.compile:
        forward = torch.compile(forward)
    # Distinct data and noise per rank and per resumed segment, reproducible from the seed.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank + step * 7919)
    local_batch = cfg.batch_size // world
    params = [p for group in groups for p in group["params"]]

    evaluator = SampleEvaluator.from_default(device=device) if cfg.eval_every and main else None
    fields = ["step", "loss", "lr", "time", *objective.log_fields] + (
        ["accuracy", "fd_lenet"] if cfg.eval_every else [])
    log_path = out / "log.csv"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.txt").write_text(repr(cfg) + "\n")

    # 3. Steps.
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not main, desc=objective.name)
    last_save, t_start, start_step, loss_avg = time.time(), time.time(), step, None
    while step < cfg.steps:
        objective.begin_step(gen)
        idx = torch.randint(len(images), (local_batch,), generator=gen)
        t = objective.timesteps(local_batch, diffusion.num_timesteps, gen).to(device)
        noise = torch.randn((local_batch, *images.shape[1:]), generator=gen).to(device)
        weights = (min_snr_weights(diffusion.alphas_cumprod, t.cpu(), cfg.min_snr_gamma).float().to(device)
                   if cfg.min_snr_gamma > 0 else None)
        factor = lr_factor(step, cfg)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            x0, y = images[idx].to(device, torch.float32), labels[idx].to(device)
            result = objective.loss(forward, diffusion, Batch(x0, y, t, noise, weights, step))
        optimizer_step(result, params, opt, cfg.grad_clip, world)
        update_ema(ema, model, cfg.ema_decay)
        step += 1

        if main:
            loss = result.loss.item()
            loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", steps_per_s=f"{(step - start_step) / (time.time() - t_start):.2f}")
            row = {"step": step, "loss": loss, "lr": f"{cfg.lr * factor:.2e}", "time": f"{time.time():.0f}",
                   **result.log}
            if evaluator is not None and step % cfg.eval_every == 0:
                metrics = evaluator.evaluate(ema, num_samples=cfg.eval_samples, progress=False)
                row.update({k: f"{v:.4f}" for k, v in metrics.items()})
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                model.train()
            append_log(log_path, row, fields)
            for detail in result.detail or []:
                append_log(out / f"{objective.detail_name}.csv", {"step": step, **detail},
                           ["step", *objective.detail_fields])
            due = (step % cfg.ckpt_every == 0 or time.time() - last_save > 60 * cfg.ckpt_minutes
                   or step == cfg.steps)
            if due:
                save_training_checkpoint(ckpt_path, model, ema, opt, cfg, step, **objective.checkpoint_extra(model))
                last_save = time.time()
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path

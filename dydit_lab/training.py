"""Training loop for DiT: AdamW, EMA, atomic resumable checkpoints, DDP through torchrun.

Run ``python -m dydit_lab train --arch DiT-lab-L --out runs/lab-L`` (add ``--resume`` to go
on from ``runs/lab-L/checkpoint.pt``), or ``torchrun --nproc_per_node=N -m dydit_lab train``
for data-parallel training (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import load_dataset
from .diffusion import GaussianDiffusion, min_snr_weights
from .models import DiT, create_model

CHECKPOINT_NAME = "checkpoint.pt"
LOG_FIELDS = ["step", "loss", "lr", "time", "accuracy", "fd_lenet"]


@dataclass
class TrainConfig:
    arch: str = "DiT-lab-L"  # a preset of dydit_lab.models (DiT-S/2 ... DiT-XL/8, DiT-lab-S/L/T)
    data: str = "mnist"  # mnist, or a folder of images with one sub-folder per class
    out: str = "runs/lab-L"  # run folder: checkpoint.pt, log.csv, config.txt
    steps: int = 12000
    batch_size: int = 128  # global batch, split across DDP ranks
    lr: float = 1e-3  # AdamW peak lr, reached after the linear warm-up
    warmup_steps: int = 200
    decay_steps: int = 0  # linear decay to 0 over the last N steps (0: constant lr after warm-up)
    weight_decay: float = 0.0
    ema_decay: float = 0.9995  # the EMA weights are what export and load_model use
    min_snr_gamma: float = 5.0  # 0 disables the min-SNR weighting
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 500  # steps between checkpoints ...
    ckpt_minutes: float = 5.0  # ... or minutes, whichever comes first
    eval_every: int = 0  # steps between sample-quality evaluations (0: never)
    eval_samples: int = 500
    device: str = "auto"  # auto: CUDA when present, else CPU
    precision: str = "fp32"  # or bf16 (autocast)
    compile: bool = False
    resume: bool = False  # go on from OUT/checkpoint.pt (model, EMA, optimizer, step)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return device


# ---------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_main(rank: int) -> bool:
    return rank == 0


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def atomic_save(obj, path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def optimizer_step(loss: torch.Tensor, params, opt, grad_clip: float, ema=None, model=None,
                   ema_decay: float = 0.0, override=None) -> None:
    """Backward, optional gradient clipping, optimizer step, then the EMA update.

    ``override = (some_params, other_loss)`` gives those parameters the gradient of
    ``other_loss`` instead of ``loss`` (DyDiT's routers get their own objective).
    """
    opt.zero_grad(set_to_none=True)
    if override is not None:
        own_params, own_loss = override
        own_grads = torch.autograd.grad(own_loss, own_params, retain_graph=True, allow_unused=True)
    loss.backward()
    if override is not None:
        for p, g in zip(own_params, own_grads):
            p.grad = g
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if ema is not None:
        update_ema(ema, model, ema_decay)


def append_log(path: Path, row: dict, fields: list[str] | None = None) -> None:
    """Append one row to a CSV log (header on first write); floats with 5 decimals."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(row), extrasaction="ignore")
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
        drop_log_rows_after(ckpt_path.parent / "log.csv", state["step"])
        return state["step"]
    if ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or pick another --out")
    return 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then (if ``decay_steps``) a linear cool-down towards 0 over the last steps."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cooldown = min(1.0, (cfg.steps - step) / cfg.decay_steps) if cfg.decay_steps else 1.0
    return cfg.lr * warmup * max(0.0, cooldown)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train(cfg: TrainConfig, model: DiT | None = None) -> Path:
    """Train (or resume) and return the path of the final checkpoint."""
    device = resolve_device(cfg.device)
    rank, world = setup_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if not 0 <= cfg.decay_steps <= cfg.steps:
        raise ValueError(f"decay_steps must be in [0, steps={cfg.steps}], got {cfg.decay_steps}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME

    model = (model or create_model(cfg.arch)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = restore_or_refuse(ckpt_path, cfg.resume, model, ema, opt, device)

    dataset = load_dataset(cfg.data, "train") if cfg.data == "mnist" else load_dataset(
        cfg.data, image_size=model.config.input_size, channels=model.in_channels)
    images, labels = (tensor.to(device) for tensor in dataset.tensors)
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(train_model) if cfg.compile else train_model
    # Distinct data and noise per rank and per resumed segment, reproducible from the seed.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank + step * 7919)
    local_batch = cfg.batch_size // world

    evaluator = None
    if cfg.eval_every and is_main(rank):
        from .evaluation import SampleEvaluator
        evaluator = SampleEvaluator.from_default(device=device)
    log_path = out / "log.csv"
    if is_main(rank):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.txt").write_text(repr(cfg) + "\n")

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not is_main(rank), desc=f"train {cfg.arch}")
    last_save, t_start, loss_ema = time.time(), time.time(), None
    start_step = step
    while step < cfg.steps:
        idx = torch.randint(len(images), (local_batch,), generator=gen).to(device)
        x0, y = images[idx], labels[idx]
        t = torch.randint(diffusion.num_timesteps, (local_batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        weights = (min_snr_weights(diffusion.alphas_cumprod, t.cpu(), cfg.min_snr_gamma).float().to(device)
                   if cfg.min_snr_gamma > 0 else None)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = diffusion.training_losses(forward, x0, t, y, noise, weights)["loss"].mean()
        optimizer_step(loss, model.parameters(), opt, cfg.grad_clip, ema, model, cfg.ema_decay)
        step += 1

        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if is_main(rank):
            rate = (step - start_step) / (time.time() - t_start)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}", steps_per_s=f"{rate:.2f}")
            row = {"step": step, "loss": f"{loss.item():.5f}", "lr": f"{lr_at(step - 1, cfg):.2e}",
                   "time": f"{time.time():.0f}"}
            if evaluator is not None and step % cfg.eval_every == 0:
                metrics = evaluator.evaluate(ema, num_samples=cfg.eval_samples, progress=False)
                row.update({k: f"{v:.4f}" for k, v in metrics.items()})
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                model.train()
            append_log(log_path, row, LOG_FIELDS)
        due = (step % cfg.ckpt_every == 0 or time.time() - last_save > 60 * cfg.ckpt_minutes
               or step == cfg.steps)
        if due and is_main(rank):
            save_training_checkpoint(ckpt_path, model, ema, opt, cfg, step)
            last_save = time.time()
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


def save_training_checkpoint(path, model, ema, opt, cfg: TrainConfig, step: int) -> None:
    """The resumable checkpoint ({"model", "ema", "opt", "args", "step"}) at one fixed path."""
    args = dataclasses.asdict(cfg) | {"model_config": dataclasses.asdict(model.config)}
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "args": args, "step": step}, path)

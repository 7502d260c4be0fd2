"""Learning-to-Cache (Ma et al. 2024, "Learning-to-Cache: Accelerating Diffusion Transformer via
Layer Caching", NeurIPS 2024): a router, one logit per sampling step and block, learned on a
frozen model, decides which blocks a step may take from the step before.

As in L2C's DiT code, steps come in pairs: an even step (0, 2, ...) runs every block and fills
the cache; the odd step after it runs block ``i`` only where sigmoid(logit[step, i]) exceeds
the threshold, and otherwise adds the residual block ``i`` left at the even step. Training
(:func:`train_cache_router`) follows the paper's objective on the model's own sampling
trajectories: the odd step's output with every block blended as ``w * fresh + (1 - w) * cached``
(w = sigmoid(logit)) must match the full model's output, plus an L1 push of w towards 0.
L2C routes attention and MLP separately; here a block is one unit, so a DyDiT's blocks can be
reused the same way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..diffusion import GaussianDiffusion
from ..models.dit import ModelWrapper
from .model import CachedModel
from .policies import CachePolicy, _check


class LearningToCache(CachePolicy):
    """Reuse where the trained router says so (see the module docstring). ``router``: the
    dict :func:`train_cache_router` returns, or a file saved by :func:`save_router`;
    ``threshold`` in [0, 1) (a block runs when its router weight exceeds it). The router
    was trained for one number of sampling steps; sampling with another is an error."""

    def __init__(self, router, threshold: float):
        super().__init__()
        self.threshold = _check("L2C threshold", threshold, isinstance(threshold, (int, float))
                                and math.isfinite(threshold) and 0 <= threshold < 1, "in [0, 1)")
        if isinstance(router, (str, Path)):
            router = load_router(router)
        self.logits = router["logits"].detach().float().cpu()
        self.steps, self.depth = self.logits.shape
        self.arch = router.get("arch")

    def __repr__(self) -> str:
        return f"LearningToCache(threshold={self.threshold}, steps={self.steps}, arch={self.arch})"

    def compute_mask(self, index: int) -> list[bool]:
        """Which blocks run at step ``index``: all of them at even steps."""
        if index % 2 == 0:
            return [True] * self.depth
        return (torch.sigmoid(self.logits[index]) > self.threshold).tolist()

    def reuse_fraction(self) -> float:
        """The fraction of block calls of a whole run this router reuses."""
        return 1 - sum(sum(self.compute_mask(i)) for i in range(self.steps)) / (self.steps * self.depth)

    def run(self, executor, x, c, step):
        if executor.depth != self.depth:
            raise ValueError(f"the L2C router has {self.depth} blocks, the model {executor.depth}")
        if (step.num_steps is not None and step.num_steps != self.steps) or step.index >= self.steps:
            raise ValueError(f"the L2C router was trained for {self.steps} sampling steps; "
                             f"this run has {step.num_steps or 'more'}")
        return self.run_blocks(executor, x, self.compute_mask(step.index))


class _Capture(CachePolicy):
    """Runs every block, keeping each block's residual (the cache an even step leaves)."""

    def reset(self) -> None:
        pass  # the training loop decides what is cached

    def run(self, executor, x, c, step):
        self.residuals = []
        for i in range(executor.depth):
            out = executor.compute_block(i, x)
            self.residuals.append(out - x)
            x = out
        return x


class _Blend(CachePolicy):
    """Each block's output blended with its cached residual by the router's soft weights."""

    def reset(self) -> None:
        pass

    def run(self, executor, x, c, step):
        for i in range(executor.depth):
            w = self.weights[i]
            x = x + w * (executor.compute_block(i, x) - x) + (1 - w) * self.residuals[i]
        return x


class _Trajectory(ModelWrapper):
    """Keeps the input and output of every call of a plain sampling run."""

    def __init__(self, model):
        super().__init__(model)
        self.calls: list[tuple] = []

    def forward(self, x, t, y):
        out = self.model(x, t, y)
        self.calls.append((x, t, y, out))
        return out


def train_cache_router(model, steps: int = 50, num_samples: int = 32, iterations: int = 300,
                       batch_size: int = 16, l1: float = 1e-3, lr: float = 0.1, seed: int = 0,
                       device="cpu", progress: bool = True) -> dict:
    """Train an L2C router for ``model`` (frozen; a DiT or DyDiT) and ``steps`` DDIM steps.

    The targets are ``num_samples`` plain sampling trajectories; each of ``iterations``
    Adam steps (``lr``) takes one odd step and ``batch_size`` trajectories, fills the cache
    from the even step before it, and minimises the output MSE + ``l1`` x mean router weight.
    Logits start at 3 (every block on) and stay in [-5, 5], as in L2C. Returns the router
    (``logits`` (steps, depth) and the settings) for :func:`save_router`.
    """
    for name, value, low in (("steps", steps, 2), ("num_samples", num_samples, 1),
                             ("iterations", iterations, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (math.isfinite(l1) and l1 >= 0 and math.isfinite(lr) and lr > 0):
        raise ValueError(f"l1 must be >= 0 and lr > 0, got l1={l1!r}, lr={lr!r}")
    start = time.perf_counter()
    cfg, depth = model.config, len(model.blocks)
    was_training, frozen = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        trajectory = _Trajectory(model)
        y = (torch.arange(num_samples) % model.num_classes).to(device)
        with torch.no_grad():
            GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps).sample(
                trajectory, y, (num_samples, model.in_channels, cfg.input_size, cfg.input_size),
                method="ddim", seed=seed, progress=False)
        capture, blend = _Capture(), _Blend()
        teacher, student = CachedModel(model, capture), CachedModel(model, blend)
        logits = torch.full((steps, depth), 3.0, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in tqdm(range(iterations), desc="L2C router", disable=not progress, leave=False):
            s = 1 + 2 * int(torch.randint(0, steps // 2, (1,), generator=gen))
            rows = torch.randperm(num_samples, generator=gen)[:batch_size].to(device)
            with torch.no_grad():
                x_prev, t_prev, _, _ = trajectory.calls[s - 1]
                teacher(x_prev[rows], t_prev[rows], y[rows])
            x, t, _, target = trajectory.calls[s]
            blend.residuals, blend.weights = capture.residuals, torch.sigmoid(logits[s]).to(device)
            out = student(x[rows], t[rows], y[rows])
            mse = torch.nn.functional.mse_loss(out, target[rows])
            loss = mse + l1 * blend.weights.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                logits.clamp_(-5, 5)
            teacher.records.clear(), student.records.clear()
            losses.append(mse.item())
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        model.train(was_training)
    tail = losses[-max(1, iterations // 10):]
    return {"logits": logits.detach(), "steps": steps, "arch": model.arch, "model": type(model).__name__,
            "num_samples": num_samples, "iterations": iterations, "batch_size": batch_size, "l1": l1, "lr": lr,
            "seed": seed, "final_mse": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


def save_router(path: str | Path, router: dict) -> Path:
    """Write a router (:func:`train_cache_router`) to ``path`` (a small torch file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(router, path)
    return path


def load_router(path: str | Path) -> dict:
    """A router saved by :func:`save_router` (read with ``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no L2C router at {path} (python -m dydit_lab train-cache-router)")
    router = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(router, dict) or not isinstance(router.get("logits"), torch.Tensor) or router["logits"].ndim != 2:
        raise ValueError(f"{path} holds no L2C router (expected a dict with 2-D 'logits')")
    return router

"""TeaCache's rescaling polynomial, fitted on a model by sampling with it.

TeaCache decides from how far the first block's modulated input moved between steps, but what
matters is how far the model's output moves. :func:`calibrate_teacache` samples a few plain runs,
pairs the two relative L1 distances of every consecutive step pair, and fits a polynomial from
the first to the second (degree 4, as TeaCache's released coefficients).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..diffusion import GaussianDiffusion
from ..models.dit import ModelWrapper
from .model import CachedModel
from .policies import TeaCache, relative_l1


class _ModulationTrace(TeaCache):
    """Runs every block and records, per call, the relative L1 distance of block 0's modulated
    input from the previous call's (None on the first call of a run)."""

    def __init__(self):
        super().__init__(0.0)
        self.distances: list[float | None] = []

    def run(self, executor, x, c, step):
        current = self.modulated_input(executor, x)
        self.distances.append(None if self._previous is None else relative_l1(current, self._previous))
        self._previous = current
        return executor.compute_blocks(range(executor.depth), x)


class _OutputTrace(ModelWrapper):
    """Records, per call, the relative L1 distance of the output from the previous call's."""

    def __init__(self, model):
        super().__init__(model)
        self.distances: list[float | None] = []
        self._previous = None

    def plan_timesteps(self, timesteps):
        self._previous = None
        return self.model.plan_timesteps(timesteps)

    def forward(self, x, t, y):
        out = self.model(x, t, y)
        self.distances.append(None if self._previous is None else relative_l1(out, self._previous))
        self._previous = out
        return out


@torch.no_grad()
def calibrate_teacache(model, steps: int = 50, num_samples: int = 16, runs: int = 2, degree: int = 4,
                       method: str = "ddim", seed: int = 0, device="cpu") -> dict:
    """Fit TeaCache's polynomial on ``model`` (a DiT or DyDiT) from ``runs`` sampling runs of
    ``num_samples`` images and ``steps`` steps (seeds ``seed``, ``seed + 1``, ...).

    Returns ``coefficients`` (highest power first, for :class:`TeaCache`), the fitted
    ``points`` (input distance, output distance) and the settings; :func:`save_coefficients`
    writes it as JSON.
    """
    for name, value, low in (("steps", steps, 2), ("num_samples", num_samples, 1), ("runs", runs, 1),
                             ("degree", degree, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    probe = _ModulationTrace()
    trace = _OutputTrace(CachedModel(model, probe))
    was_training = model.training
    model.eval()
    cfg = model.config
    diffusion = GaussianDiffusion(learn_sigma=cfg.learn_sigma).respaced(steps)
    y = (torch.arange(num_samples) % model.num_classes).to(device)
    for run in range(runs):
        diffusion.sample(trace, y, (num_samples, model.in_channels, cfg.input_size, cfg.input_size),
                         method=method, seed=seed + run, progress=False)
    model.train(was_training)
    points = [(a, b) for a, b in zip(probe.distances, trace.distances) if a is not None and b is not None]
    if len(points) <= degree:
        raise ValueError(f"{len(points)} step pairs cannot fit a degree-{degree} polynomial: sample more steps")
    x, y_out = np.array(points).T
    coefficients = np.polyfit(x, y_out, degree)
    fitted = np.poly1d(coefficients)(x)
    return {
        "coefficients": [float(v) for v in coefficients], "degree": degree, "arch": model.arch,
        "model": type(model).__name__, "steps": steps, "num_samples": num_samples, "runs": runs,
        "method": method, "seed": seed, "points": [[float(a), float(b)] for a, b in points],
        "rms_error": float(np.sqrt(np.mean((fitted - y_out) ** 2))),
    }


def save_coefficients(path: str | Path, result: dict) -> Path:
    """Write a :func:`calibrate_teacache` result as JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def load_coefficients(path: str | Path) -> list[float]:
    """The polynomial coefficients stored by :func:`save_coefficients`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no TeaCache coefficients at {path} (python -m dydit_lab calibrate-teacache)")
    try:
        coefficients = json.loads(path.read_text())["coefficients"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} holds no TeaCache coefficients ({err})") from None
    return [float(v) for v in coefficients]

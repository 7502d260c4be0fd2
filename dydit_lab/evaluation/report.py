"""Reports of one model or checkpoint: what sampling it gives (quality, compute, wall-clock)
and what a preset costs by formula and by fvcore's tracer."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import flops
from ..checkpoints import read_checkpoint
from ..models.configs import DiTConfig, get_config
from ..models.dit import DiT
from ..paths import display_path
from .metrics import SampleEvaluator
from .sampling import sampling_model, timed_generate


def evaluate_checkpoint(checkpoint: str | Path, num_samples: int = 1000, steps: int = 50,
                        method: str = "ddim", cfg_scale: float = 1.0, seed: int = 0,
                        coarse_steps: int | None = None, complete_model: bool = False,
                        evaluator: SampleEvaluator | None = None, device="cpu", progress: bool = True,
                        complete_from_t: int = 0, bootstrap: int = 0, cache: str | None = None) -> dict:
    """Sample from a checkpoint (DiT, DyDiT or FlexiDiT) and measure what it costs.

    Returns the quality metrics (``accuracy``, ``fd_lenet``), the compute
    (the model's own ``sampling_cost``, and ``gflops_per_image`` = per step x steps) and the measured sampling
    wall-clock ``seconds_per_image`` (generation only, at the evaluator's batch size, with the
    current torch thread count in ``threads``). ``coarse_steps``, ``complete_model``,
    ``complete_from_t`` and ``cache`` (a feature-caching spec, recorded): see
    :func:`sampling_model`. ``seed`` (the sampling seed) and the checkpoint's training seed
    (``train_seed``) are recorded; ``bootstrap`` > 0 adds 95 % intervals of both metrics over
    the samples.
    """
    device = torch.device(device)
    evaluator = evaluator or SampleEvaluator.from_default(device=device)
    saved = read_checkpoint(checkpoint)
    model = sampling_model(checkpoint, steps, coarse_steps, complete_model, device, saved=saved,
                           complete_from_t=complete_from_t, cache=cache)
    samples, labels, seconds = timed_generate(model, num_samples, steps=steps, method=method,
                                              cfg_scale=cfg_scale, seed=seed, device=device, progress=progress)
    cost = model.sampling_cost(steps, method, device)
    recorded = saved.get("args") if isinstance(saved.get("args"), dict) else {}
    return {
        "checkpoint": display_path(checkpoint), "train_steps": saved.get("step", recorded.get("step")),
        "train_seed": recorded.get("seed"), "seed": seed,
        "steps": steps, "method": method, "cfg_scale": cfg_scale, "num_samples": num_samples,
        "coarse_steps": coarse_steps, **({"cache": cache} if cache else {}), **cost,
        # classifier-free guidance runs the conditional and unconditional halves each step
        "gflops_per_image": cost["gflops_per_step"] * steps * (1 if cfg_scale == 1 else 2),
        "seconds_per_image": seconds, "device": device.type,
        "threads": torch.get_num_threads(), **evaluator.score(samples, labels, bootstrap=bootstrap, seed=seed),
    }


def _model_for_counting(config: DiTConfig, arch: str) -> DiT:
    """A DiT with uninitialised CPU weights: FLOPs do not depend on the values, and skipping
    the initialisation avoids touching (and randomly filling) every page of a large model."""
    with torch.device("meta"):
        model = DiT(config, arch=arch)
    return model.to_empty(device="cpu")


def count_flops_report(arch: str, input_size: int = 32) -> dict:
    """FLOPs (MACs) and parameters of preset ``arch`` at ``input_size``, for ONE sample.

    Keys: ``arch``, ``input_size``, ``tokens``, ``params_m``, ``macs`` (exact integer),
    ``gflops`` (analytic, = macs / 1e9), ``gflops_fvcore`` (fvcore with the attention handle;
    equals ``gflops``), ``gflops_fvcore_naive`` (stock fvcore, without attention matmuls), then
    ``gflops_<part>`` for every part of :func:`analytic_flops`.
    Raises ValueError for an unknown arch or an input size the patch size does not divide.
    """
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    cfg = get_config(arch, input_size=input_size)  # ValueError: unknown arch / indivisible size
    model = _model_for_counting(cfg, arch)
    counts = flops.fvcore_counts(model, input_size, batch_size=1)
    fvcore_total = sum(counts.values())
    parts = flops.analytic_flops(cfg)
    report = {
        "arch": arch,
        "input_size": input_size,
        "tokens": flops.num_tokens(cfg),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "macs": parts["total"],
        "gflops": parts["total"] / 1e9,
        "gflops_fvcore": fvcore_total / 1e9,
        # One trace serves both: stock fvcore is the same count minus the SDPA handle's share.
        "gflops_fvcore_naive": (fvcore_total - counts.get("scaled_dot_product_attention", 0)) / 1e9,
    }
    report.update({f"gflops_{name}": macs / 1e9 for name, macs in parts.items() if name != "total"})
    return report

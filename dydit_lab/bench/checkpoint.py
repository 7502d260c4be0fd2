"""Timing a trained DyDiT checkpoint (a lab fine-tune or a released DyDiT-XL) on the user's
device: its really-skipping sliced path and the official-style masked path against the same
weights with every gate on (the static DiT it was fine-tuned from, in cost), on the inputs of
a real sampling run of the checkpoint, so its routers see what they see in sampling.

Same timing as ``python -m dydit_lab bench`` (:func:`.run.time_paths`: warm-up, interleaved
repeats, median), which sets random models' routers to a target instead.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from ..analysis.routing import RoutingTrace, trace_sampling
from ..checkpoints import load_model
from ..models.dydit import CompleteModel, DyDiT
from ..paths import resolve_device
from .run import mean_flops_fraction, pass_fields, sliced_vs_masked, time_paths
from .setup import describe_device, set_threads
from .workload import BenchInputs


def trace_inputs(trace: RoutingTrace, device="cpu") -> BenchInputs:
    """The model inputs of every step of a recorded sampling run, as benchmark inputs."""
    device = torch.device(device)
    batch = len(trace.labels)
    return BenchInputs(timesteps=list(trace.timesteps), x=[x.to(device) for x in trace.x_t],
                       t=[torch.full((batch,), t, dtype=torch.long) for t in trace.timesteps],  # host, as sampled
                       y=trace.labels.to(device))


def own_run(model: DyDiT, batch_size: int, steps: int, seed: int = 0, device="auto", threads: int | None = None,
            purpose: str = "this") -> tuple[DyDiT, torch.device, RoutingTrace]:
    """The model on ``device`` in eval mode and its recorded DDIM run of ``steps`` steps
    (``batch_size`` images, labels 0, 1, ..., no guidance): the workload that is timed or
    profiled. ``threads``: torch's intra-op thread count (default: leave it)."""
    if not isinstance(model, DyDiT):
        raise ValueError(f"{purpose} needs a DyDiT checkpoint, got a {type(model).__name__}")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be positive, got {batch_size}, {steps}")
    set_threads(threads)
    device = resolve_device(device)
    model = model.to(device).eval()
    labels = torch.arange(batch_size) % model.num_classes
    return model, device, trace_sampling(model, labels, steps=steps, seed=seed, device=device, progress=False)


def checkpoint_speedup(model: DyDiT, batch_size: int = 4, steps: int = 20, repeats: int = 3,
                       seed: int = 0, device="auto", name: str | None = None, threads: int | None = None,
                       plan_conditioning: bool = True) -> dict:
    """Seconds per sampling step of ``model`` (sliced and masked) and of its complete model,
    timed on the inputs of a DDIM run of ``steps`` steps (labels 0, 1, ..., ``batch_size``
    images, no guidance); speed-ups, the FLOPs fraction of the timed routing, what ran where
    and how far the sliced outputs are from the masked ones. ``threads``: torch's intra-op
    thread count (default: leave it). ``plan_conditioning``: as :func:`.run.time_paths`."""
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    model, device, trace = own_run(model, batch_size, steps, seed, device, threads, purpose="a speed-up")
    timing = time_paths(CompleteModel(model), model, trace_inputs(trace, device), repeats, device,
                        plan_conditioning=plan_conditioning)
    routings = [routing for _, routing in timing["outputs"]["sliced"]]
    agreement = sliced_vs_masked(timing["outputs"])
    mean = lambda values: float(torch.stack([v.float().mean().cpu() for v in values]).mean())  # noqa: E731
    flops_ratio = mean_flops_fraction(model.config, routings)
    per_step = {path: statistics.median(times) / steps for path, times in timing["times"].items()}
    speedup = per_step["static"] / per_step["sliced"]
    return {
        "name": name or model.arch or "DyDiT", "arch": model.arch, "device": str(device),
        "device_name": describe_device(device),
        "batch_size": batch_size, "steps": steps, "repeats": repeats, "conditioning_planned": plan_conditioning,
        "flops_ratio": flops_ratio,
        "static_seconds": per_step["static"], "dynamic_seconds": per_step["sliced"],
        "masked_seconds": per_step["masked"], "speedup": speedup, **pass_fields(timing, flops_ratio),
        "masked_speedup": per_step["static"] / per_step["masked"], "ideal_speedup": 1 / flops_ratio,
        "efficiency": speedup * flops_ratio, "token_keep_rate": mean(r.tokens for r in routings),
        "max_relative_diff_sliced_masked": agreement["max_relative_diff_sliced_masked"],
        "token_decisions_flipped": agreement["token_decisions_flipped"],
        "token_decisions": agreement["token_decisions"],
        "num_threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }


def checkpoint_sweep(checkpoint: str, batch_sizes: list[int], steps: int = 50, repeats: int = 3,
                     device="auto", threads: int | None = None, progress: bool = True,
                     plan_conditioning: bool = True) -> list[dict]:
    """:func:`checkpoint_speedup` of a DyDiT checkpoint file at each of ``batch_sizes`` (one row
    each, named after the file, with its path)."""
    model = load_model(checkpoint, device=resolve_device(device))
    rows = []
    for batch in batch_sizes:
        row = checkpoint_speedup(model, batch_size=batch, steps=steps, repeats=repeats, device=device,
                                 name=Path(checkpoint).stem, threads=threads, plan_conditioning=plan_conditioning)
        rows.append({"checkpoint": str(checkpoint), **row})
        if progress:
            print(f"{row['name']} batch {batch}: {row['speedup']:.3f}x of ideal {row['ideal_speedup']:.3f}x "
                  f"({row['efficiency']:.3f}; best pass {row['best_pass_efficiency']:.3f}), "
                  f"{row['num_threads']} thread(s)", file=sys.stderr, flush=True)
    return rows

"""Wall-clock benchmark: static DiT vs DyDiT (sliced and masked execution) at a FLOPs target,
with routers set by :mod:`.router_setting` (no training); one run, a batch-size sweep, CSV output."""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..memory import freed_memory_kept, minor_page_faults
from ..models import flops as flops_lib
from ..models.configs import DiTConfig, get_config
from ..models.dit import DiT
from ..models.dydit import DyDiT
from ..models.routers import Routing
from ..paths import resolve_device
from .router_setting import DEFAULT_KEEP_RATE, DEFAULT_WIDTH_SLOPE
from .setup import describe_device, prepare_bench
from .workload import BenchInputs, build_models


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA only: kernels are asynchronous, wait before reading a timer
        torch.cuda.synchronize(device)


@torch.no_grad()
def _timed_call(fn, x, t, y, device: torch.device) -> tuple[float, object]:
    """Seconds for one model forward, and its output."""
    _sync(device)
    start = time.perf_counter()
    out = fn(x, t, y)
    _sync(device)
    return time.perf_counter() - start, out


def time_paths(dit: DiT, dydit: DyDiT, inputs: BenchInputs, repeats: int = 3,
               device: torch.device | None = None, observer=None, plan_conditioning: bool = True) -> dict:
    """Seconds per pass over the steps of the static DiT and of DyDiT sliced/masked
    (:func:`time_interleaved` of the three paths, named ``static``, ``sliced``, ``masked``).
    With ``plan_conditioning`` each path's first step plans the pass's adaLN modulation, as a
    sampler does before its run (:mod:`dydit_lab.models.conditioning`), timed with that step.
    Returns each path's per-pass totals, every forward's seconds, page faults per pass, and the
    last pass's outputs (and routings)."""
    device = device or next(dit.parameters()).device
    dit.eval(), dydit.eval()

    def path(model, execution=None):
        def fn(x, t, y):
            if plan_conditioning and t is inputs.t[0]:
                model.plan_conditioning(inputs.timesteps, inputs.y)
            if execution is None:
                return model(x, t, y)
            model.execution = execution
            return model(x, t, y, return_routing=True)
        return fn

    try:
        return time_interleaved({"static": path(dit), "sliced": path(dydit, "sliced"),
                                 "masked": path(dydit, "masked")}, inputs, repeats, device, observer)
    finally:
        dydit.execution = "sliced"
        dit.plan_conditioning(None), dydit.plan_conditioning(None)


def time_interleaved(paths: dict, inputs: BenchInputs, repeats: int, device: torch.device,
                     observer=None) -> dict:
    """Seconds per pass over the steps of each of ``paths`` (name -> ``fn(x, t, y)``).

    One untimed warm-up pass per path (it also fills the sliced-weight cache), then
    ``repeats`` timed passes. The paths are interleaved at every step, in an order that
    rotates from step to step: a shared machine's speed drifts by tens of percent over
    seconds, and a drift that hits one forward of each path in turn cancels in their ratio
    (interleaving whole passes let it land on one path). A pass's outputs stay alive until
    it ends, as in a sampling run (the allocator then keeps freed buffers; freeing each
    output at once changes both paths' times). Returns each path's per-pass totals
    (``times``), every forward's seconds (``step_seconds[path]``: one list per pass, one time
    per step, for :func:`best_pass`), fresh pages faulted per pass (``faults``) and the last
    pass's outputs.

    ``observer`` (e.g. the :class:`.stages.StageTotals` of ``stage_clocks``) gets
    ``observer.path`` set to the path name before every forward and ``observer.reset()``
    called after the warm-up.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    names = list(paths)

    def call(name, x, t):
        if observer is not None:
            observer.path = name
        return _timed_call(paths[name], x, t, inputs.y, device)

    for name in names:  # warm-up
        for x, t in zip(inputs.x, inputs.t):
            call(name, x, t)
    if observer is not None:
        observer.reset()
    step_seconds = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)  # fresh pages each path touched (see dydit_lab.memory)
    for _ in range(repeats):
        outs = {name: [] for name in names}
        for name in names:
            step_seconds[name].append([])
        for step, (x, t) in enumerate(zip(inputs.x, inputs.t)):
            for k in range(len(names)):
                name = names[(step + k) % len(names)]
                faults_before = minor_page_faults()
                seconds, out = call(name, x, t)
                faults[name] += minor_page_faults() - faults_before
                step_seconds[name][-1].append(seconds)
                outs[name].append(out)
    times = {name: [sum(one_pass) for one_pass in passes] for name, passes in step_seconds.items()}
    return {"times": times, "step_seconds": step_seconds, "outputs": outs,
            "faults": {name: n / repeats for name, n in faults.items()}}


NOISY_SPREAD = 0.05  # identical work varying more than this cannot resolve the few per cent the bench claims


def pass_spread(seconds: list[float]) -> float:
    """How much identical work varied within one run: (max - min) / median of its passes' times.
    Fractions of the ideal read to a few per cent need the static passes' well under :data:`NOISY_SPREAD`."""
    return (max(seconds) - min(seconds)) / statistics.median(seconds)


def best_pass(step_seconds: list[list[float]]) -> float:
    """Each step's fastest forward over the passes (``step_seconds[pass][step]``), summed over
    the steps: what the pass costs when nothing else wants the cores. Contention on a shared
    machine only ever adds time, so the per-step minimum is a second estimate of the otherwise
    idle machine the bench asks for, beside the median pass (the paths are interleaved per
    step, so each gets the same chances at a quiet moment). It can favour the shorter path, and
    on a noisy host neither estimate is reliable: ``bench --profile noise`` (:mod:`.noise`)
    measures both on a known ratio."""
    if not step_seconds or any(len(times) != len(step_seconds[0]) for times in step_seconds):
        raise ValueError("best_pass needs one or more passes of the same number of steps")
    return sum(min(times) for times in zip(*step_seconds))


def pass_fields(timing: dict, flops_ratio: float) -> dict:
    """What a result record keeps of :func:`time_paths`'s ``timing``: the raw pass times, the
    static passes' :func:`pass_spread`, each path's page faults per pass, whether freed
    buffers were kept for reuse (:mod:`dydit_lab.memory`; without it the faults cost time),
    and the speed-ups read off :func:`best_pass` (``best_pass_*``: a second estimate of the
    idle machine, beside the median-pass ``speedup``/``efficiency`` the caller computes)."""
    times, faults = timing["times"], timing["faults"]
    best = {name: best_pass(seconds) for name, seconds in timing["step_seconds"].items()}
    best_speedup = best["static"] / best["sliced"]
    return {"static_pass_seconds": times["static"], "dynamic_pass_seconds": times["sliced"],
            "masked_pass_seconds": times["masked"], "static_pass_spread": pass_spread(times["static"]),
            "static_best_pass_seconds": best["static"], "dynamic_best_pass_seconds": best["sliced"],
            "masked_best_pass_seconds": best["masked"], "best_pass_speedup": best_speedup,
            "best_pass_efficiency": best_speedup * flops_ratio,
            "best_pass_masked_speedup": best["static"] / best["masked"],
            "static_faults_per_pass": faults["static"], "dynamic_faults_per_pass": faults["sliced"],
            "masked_faults_per_pass": faults["masked"], "freed_memory_kept": freed_memory_kept()}


def sliced_vs_masked(outputs: dict) -> dict:
    """How far the sliced path's outputs (``time_paths``'s last pass) are from the masked
    path's: token decisions that differ, of all, and the largest absolute and relative
    output difference. A token whose router score sits at the threshold can flip between the
    two (their float sums differ in order); one flipped token moves the outputs by its MLP update."""
    pairs = list(zip(outputs["sliced"], outputs["masked"]))
    return {
        "token_decisions_flipped": sum(int((a.tokens != b.tokens).sum()) for (_, a), (_, b) in pairs),
        "token_decisions": sum(a.tokens.numel() for (_, a), _ in pairs),
        "max_abs_diff_sliced_masked": max(float((a - b).abs().max()) for (a, _), (b, _) in pairs),
        "max_relative_diff_sliced_masked": max(float((a - b).abs().max() / b.abs().max()) for (a, _), (b, _) in pairs),
    }


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------


def mean_flops_fraction(config: DiTConfig, routings: list[Routing]) -> float:
    """The FLOPs fraction of ``routings`` (one per step), averaged over samples and steps."""
    return float(torch.stack([r.flops_fraction(config).float().mean().cpu() for r in routings]).mean())


def _routing_summary(config: DiTConfig, routings: list[Routing]) -> dict:
    per_step = [float(r.flops_fraction(config).mean()) for r in routings]
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    heads = [float(r.heads.float().mean()) for r in routings]
    groups = [float(r.groups.float().mean()) for r in routings]
    tokens = [float(r.tokens.float().mean()) for r in routings]
    return {
        "flops_ratio": mean(per_step),
        "token_keep_rate": mean(tokens),
        "head_fraction": mean(heads),
        "group_fraction": mean(groups),
        "flops_ratio_per_step": per_step,
        "head_fraction_per_step": heads,
        "group_fraction_per_step": groups,
        "token_keep_rate_per_step": tokens,
    }


def run_benchmark(arch: str, input_size: int = 32, target_ratio: float = 0.5, batch_size: int = 2,
                  steps: int = 4, repeats: int = 3, device: str = "auto", seed: int = 0,
                  keep_rate: float = DEFAULT_KEEP_RATE, width_slope: float = DEFAULT_WIDTH_SLOPE,
                  threads: int | None = None, models: tuple[DiT, DyDiT] | None = None,
                  verbose: bool = False, plan_conditioning: bool = True) -> dict:
    """Build (or reuse) the models, set the routers for ``target_ratio`` and time the three
    paths; returns the result record (JSON-ready). ``threads`` sets torch's intra-op thread
    count (default: leave torch's choice, i.e. all cores or OMP_NUM_THREADS). Raises
    ValueError for a bad arch, device, target ratio, batch size, step or repeat count."""
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    bench = prepare_bench(arch, input_size, target_ratio, batch_size, steps, resolve_device(device), seed,
                          keep_rate, width_slope, threads, models)
    cfg, dit, dydit, inputs, setting, dev = (bench.dit.config, bench.dit, bench.dydit, bench.inputs,
                                             bench.setting, bench.device)
    say(f"models, inputs and routers ready in {time.perf_counter() - t0:.1f}s ({setting.iterations} "
        f"calibration passes): {setting.flops_ratio:.4f} of the FLOPs")
    t2 = time.perf_counter()
    timing = time_paths(dit, dydit, inputs, repeats, dev, plan_conditioning=plan_conditioning)
    say(f"timed in {time.perf_counter() - t2:.1f}s")

    outs = timing["outputs"]
    sliced_routings = [r for _, r in outs["sliced"]]
    masked_routings = [r for _, r in outs["masked"]]
    summary = _routing_summary(cfg, sliced_routings)
    agreement = sliced_vs_masked(outs)
    routing_agree = agreement["token_decisions_flipped"] == 0 and all(
        torch.equal(a.heads, b.heads) and torch.equal(a.groups, b.groups)
        for a, b in zip(sliced_routings, masked_routings))

    per_step = lambda name: statistics.median(timing["times"][name]) / steps  # noqa: E731
    static, dynamic, masked = per_step("static"), per_step("sliced"), per_step("masked")
    ideal = 1.0 / summary["flops_ratio"]
    speedup = static / dynamic
    total = flops_lib.analytic_flops(cfg)["total"]
    result = {
        "arch": arch,
        "input_size": input_size,
        "tokens": flops_lib.num_tokens(cfg),
        "device": str(dev),
        "device_name": describe_device(dev),
        "batch_size": batch_size,
        "steps": steps,
        "timesteps": inputs.timesteps,
        "repeats": repeats,
        "conditioning_planned": plan_conditioning,
        "target_ratio": target_ratio,
        "flops_ratio": summary["flops_ratio"],
        "static_seconds": static,
        "dynamic_seconds": dynamic,
        "masked_seconds": masked,
        "speedup": speedup,
        "masked_speedup": static / masked,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "token_keep_rate": summary["token_keep_rate"],
        "head_fraction": summary["head_fraction"],
        "group_fraction": summary["group_fraction"],
        "flops_ratio_per_step": summary["flops_ratio_per_step"],
        "head_fraction_per_step": summary["head_fraction_per_step"],
        "group_fraction_per_step": summary["group_fraction_per_step"],
        "token_keep_rate_per_step": summary["token_keep_rate_per_step"],
        "static_gflops_per_sample": total / 1e9,
        **pass_fields(timing, summary["flops_ratio"]),
        "routing_agree": routing_agree,
        "max_abs_diff_sliced_masked": agreement["max_abs_diff_sliced_masked"],
        "token_decisions_flipped": agreement["token_decisions_flipped"],
        "token_decisions": agreement["token_decisions"],
        **setting.as_dict(),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_before": list(load_before) if load_before else None,
        "load_average_after": list(os.getloadavg()) if load_before else None,
        "seed": seed,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return result


def parse_batch_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep-batch takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--sweep-batch takes positive batch sizes, got {text!r}")
    return values


def _csv_cell(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """One row per result; columns are the keys of the first row (lists JSON-encoded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    return path


def sweep_name(arch: str, device: str, target_ratio: float) -> str:
    slug = arch.replace("DiT-", "").replace("/", "").replace("-", "_").lower()
    return f"{device}_{slug}_r{target_ratio:g}_sweep"


def median_of_runs(runs: list[list[dict]]) -> list[dict]:
    """Combine separate runs of one sweep (``runs[i][j]``: run i, batch size j) into one row per
    batch size: the run whose speed-up is the median (the lower median for an even count), so
    every number in a row comes from one measurement, plus ``runs`` and every run's speed-up
    and efficiency. One run's repeats share the machine's state of that minute; separate runs
    show how much the result moves between minutes."""
    if not runs or any(len(run) != len(runs[0]) for run in runs):
        raise ValueError("median_of_runs needs one or more runs (--runs must be positive), "
                         "each with the same batch sizes")
    rows = []
    for per_batch in zip(*runs):
        if len({row["batch_size"] for row in per_batch}) != 1:
            raise ValueError("runs differ in batch sizes: " + ", ".join(str(r["batch_size"]) for r in per_batch))
        ranked = sorted(per_batch, key=lambda row: row["speedup"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "runs": len(per_batch),
                     "speedup_runs": [row["speedup"] for row in per_batch],
                     "efficiency_runs": [row["efficiency"] for row in per_batch],
                     **_best_pass_runs(per_batch)})
    return rows


def _best_pass_runs(per_batch: list[dict]) -> dict:
    """Every run's best-pass efficiency and masked speed-up, and their medians (a row from an
    older bench without best-pass fields gets none)."""
    if any("best_pass_efficiency" not in row for row in per_batch):
        return {}
    runs = {key: [row[key] for row in per_batch] for key in ("best_pass_efficiency", "best_pass_masked_speedup")}
    return {**{f"{key}_runs": values for key, values in runs.items()},
            **{f"{key}_median": statistics.median(values) for key, values in runs.items()}}


def noise_warnings(rows: list[dict]) -> list[str]:
    """Where a bench result is not resolved to a few per cent: rows whose static passes spread
    more than :data:`NOISY_SPREAD`, or whose separate runs (``--runs``) span more than that in
    efficiency. An empty list says nothing about a target; a line says the machine was too noisy."""
    lines = []
    for row in rows:
        where = f"{row.get('name') or row.get('arch')}, batch {row['batch_size']}"
        spread = row.get("static_pass_spread")
        if spread is not None and spread > NOISY_SPREAD:
            lines.append(f"{where}: the static passes (identical work) spread {spread:.0%}")
        runs = row.get("efficiency_runs") or []
        if len(runs) > 1 and max(runs) - min(runs) > NOISY_SPREAD:
            lines.append(f"{where}: the {len(runs)} runs read {min(runs):.3f}-{max(runs):.3f} of the ideal")
    return lines


def warn_noise(rows: list[dict]) -> list[dict]:
    """Print :func:`noise_warnings` to stderr (with what they mean) and return ``rows``."""
    lines = noise_warnings(rows)
    if lines:
        print("warning: this machine was too noisy to resolve a few per cent (an otherwise idle machine, "
              "fixed threads and --runs 3 help):\n  " + "\n  ".join(lines), file=sys.stderr, flush=True)
    return rows


def run_sweep(arch: str, batch_sizes: list[int], *, device: str = "auto", input_size: int = 32,
              verbose: bool = False, **kwargs) -> list[dict]:
    """:func:`run_benchmark` for several batch sizes on one pair of models."""
    get_config(arch, input_size=input_size)
    dev = resolve_device(device)
    models = build_models(arch, input_size, dev, kwargs.get("seed", 0))
    rows = []
    for batch in batch_sizes:
        rows.append(run_benchmark(arch, input_size=input_size, batch_size=batch, device=str(dev),
                                  models=models, verbose=verbose, **kwargs))
        if verbose:
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows

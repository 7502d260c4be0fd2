"""The figures of the notebooks, built from the committed checkpoints in ``data/``.

Each ``*_figure`` function computes what it needs and returns ``(Figure, table)``; the
notebooks call them to display, ``python -m dydit_lab figures`` (``make figures``) calls
them to write ``figures/*.png``. One code path for both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch

from ..analysis.loss_gap import per_run_loss, summarize_seed_gap
from ..analysis.loss_maps import patch_loss_maps, stroke_concentration
from ..analysis.routing import trace_sampling
from ..analysis.tradeoff import recipe_curves
from ..bench.run import pass_spread
from ..checkpoints import load_model
from ..data import mnist_split
from ..evaluation.sampling import generate
from ..caching.drift import caching_drift
from ..evaluation.results import read_results
from ..evaluation.strategies import CACHING, select, strategy_table
from ..models.flops import analytic_flops, num_tokens, schedule_flops
from ..models.configs import get_config
from ..paths import BENCH_DIR, CHECKPOINT_DIR, DATA_DIR, FIGURES_DIR, RESULTS_CSV
from .caching_plots import plot_caching_drift
from .gap_plots import plot_gap_panels
from .plots import (plot_loss_maps, plot_quality_vs_flops, plot_sample_grid, plot_speedup_vs_batch,
                    plot_speedup_vs_ratio, plot_strategies, save_figure, display_name)
from .routing_plots import (plot_flops_per_step, plot_token_keep, plot_token_map, plot_width_curves,
                            plot_width_heatmap)
from .token_map_plots import token_maps_figure
from .tradeoff_plots import plot_recipe_curves
LAB_MODELS = ("DiT-lab-S", "DiT-lab-L")
PARENT_SEEDS = (0, 1)  # training seeds of each parent in data/parents/ (parents-S.toml, parents-L.toml)
REGENERATE = {
    "DiT-lab-S": "python -m dydit_lab train --arch DiT-lab-S --out runs/lab-S --steps 12000 "
                 "--batch-size 128, then python -m dydit_lab export (see README)",
    "DiT-lab-L": "python -m dydit_lab train --arch DiT-lab-L --out runs/lab-L --batch-size 64, "
                 "then python -m dydit_lab export (see README)",
}


def checkpoint_path(name: str) -> Path:
    """``data/checkpoints/<name>.pt``; a clear error naming the command that makes it."""
    path = CHECKPOINT_DIR / f"{name}.pt"
    if not path.exists():
        how = REGENERATE.get(name, "see the README")
        raise FileNotFoundError(f"missing {path}: make it with {how}")
    return path


def lab_model(name: str, device="cpu"):
    return load_model(checkpoint_path(name), device=device)


# ---------------------------------------------------------------------------
# Foundation: sample grids
# ---------------------------------------------------------------------------


def sample_grid_figure(name: str, num: int = 50, steps: int = 50, seed: int = 0, device="cpu"):
    """Class-conditional DDIM samples of a lab model: 5 per digit, one column per class."""
    model = lab_model(name, device)
    samples, labels = generate(model, num, steps=steps, seed=seed, device=device, progress=False)
    order = torch.argsort(labels * num + torch.arange(num))  # group by digit, row = repeat
    grid = samples[order].reshape(10, num // 10, *samples.shape[1:]).transpose(0, 1).reshape_as(samples)
    glabels = labels[order].reshape(10, num // 10).T.reshape(-1)
    fig = plot_sample_grid(grid, glabels, nrow=10, title=f"{name}: DDIM-{steps} samples")
    return fig, pd.DataFrame({"label": labels.numpy()})


# ---------------------------------------------------------------------------
# Notebook 01: loss gap (DyDiT Figure 1(a))
# ---------------------------------------------------------------------------


LOSS_GAP_TITLE = "Noise-prediction loss: small vs large lab DiT (MNIST val)"


def loss_gap_figure(checkpoints: Mapping[str, Sequence] | None = None, timesteps=range(0, 1000, 2),
                    samples_per_t: int = 24, smooth: int = 9, device="cpu", progress: bool = True):
    """Per-timestep loss of a small and a large model on the same images and noise, the absolute
    and the relative gap with their 95 % evaluation-noise band and, with several training runs
    per size, the between-seed range; returns (Figure, summary per quarter of the timesteps).

    ``checkpoints``: size name -> checkpoint paths, one per training seed, small size first
    (default: both training seeds of each parent in ``data/parents/``). Notebook 01 makes the
    same calls one by one."""
    checkpoints = checkpoints or {name: [DATA_DIR / "parents" / f"{name}-seed{seed}.pt" for seed in PARENT_SEEDS]
                                  for name in LAB_MODELS}
    small, large = checkpoints
    images, labels = mnist_split("val").tensors
    losses = per_run_loss(checkpoints, images, labels, timesteps=timesteps, samples_per_t=samples_per_t,
                          device=device, progress=progress)
    fig = plot_gap_panels(losses, small, large, smooth=smooth, title=LOSS_GAP_TITLE)
    return fig, summarize_seed_gap(losses, small, large)


# ---------------------------------------------------------------------------
# Notebook 02: per-patch loss maps (DyDiT Figure 1(b))
# ---------------------------------------------------------------------------

LOSS_MAP_TIMESTEPS = (50, 250, 500, 750, 950)
LOSS_MAPS_TITLE = "Where the loss is: per-patch eps error of DiT-lab-L (normalised per map)"


def loss_maps_figure(num_images: int = 4, timesteps=LOSS_MAP_TIMESTEPS, summary_images: int = 200,
                     device="cpu"):
    """Normalised per-patch loss maps of the large lab model beside x_t and the clean digit,
    and the share of the loss on stroke patches (over ``summary_images`` digits)."""
    model = lab_model("DiT-lab-L", device)
    images, labels = mnist_split("val").tensors
    picks = evenly_spaced(len(images), num_images)
    shown = patch_loss_maps(model, images[picks], labels[picks], timesteps, device=device)
    fig = plot_loss_maps(shown, images[picks], labels[picks], title=LOSS_MAPS_TITLE)
    many = patch_loss_maps(model, images[:summary_images], labels[:summary_images], timesteps, device=device)
    return fig, stroke_concentration(many, images[:summary_images])


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``range(total)``."""
    return torch.arange(count) * (total // count)


# ---------------------------------------------------------------------------
# Notebook 03: router schedules of the fine-tuned DyDiTs
# ---------------------------------------------------------------------------

DYDIT_CHECKPOINTS = {"lambda = 0.7": "DyDiT-lab-L-0.7", "lambda = 0.5": "DyDiT-lab-L-0.5"}
for _lam in ("0.7", "0.5"):
    REGENERATE[f"DyDiT-lab-L-{_lam}"] = (
        f"python -m dydit_lab finetune --parent data/checkpoints/DiT-lab-L.pt --target-ratio {_lam} "
        f"--out runs/dydit-L-{_lam}, then python -m dydit_lab export (see README)")


def router_traces(checkpoints: dict | None = None, steps: int = 50, labels=range(10), seed: int = 0,
                  device="cpu") -> dict:
    """A recorded DDIM sampling run (one digit of each class) of each DyDiT in ``checkpoints``
    (name -> path; default: the committed fine-tunes)."""
    checkpoints = checkpoints or {name: checkpoint_path(ckpt) for name, ckpt in DYDIT_CHECKPOINTS.items()}
    return {name: trace_sampling(load_model(path, device=device), list(labels), steps=steps, seed=seed,
                                 device=device, progress=False, name=name)
            for name, path in checkpoints.items()}


def router_schedules_figure(traces: dict | None = None, device="cpu"):
    """Per-block head and MLP-group widths vs t for every DyDiT, token keep-rates and the
    FLOPs fraction per step; the table has each model's mean routing over the run."""
    traces = traces or router_traces(device=device)
    fig = plt.figure(figsize=(13, 4 * len(traces) + 4), layout="constrained")
    grid = fig.subplots(len(traces) + 1, 3)
    for row, trace in zip(grid, traces.values()):
        plot_width_heatmap(trace, "heads", ax=row[0])
        plot_width_heatmap(trace, "groups", ax=row[1])
        plot_token_keep(trace, ax=row[2])
    plot_flops_per_step(list(traces.values()), ax=grid[-1][0])
    plot_width_curves(list(traces.values()), ax=grid[-1][1])
    first = next(iter(traces.values()))
    # Show the block and step where SDT keeps closest to half the tokens: a map that is all
    # kept or all skipped says nothing about *which* tokens the router picks.
    keep = first.tokens.float().mean(dim=(1, 3))  # (steps, blocks)
    step, layer = divmod(int((keep - 0.5).abs().argmin()), keep.shape[1])
    plot_token_map(first, step=step, sample=0, layer=layer, ax=grid[-1][2])
    table = pd.DataFrame([{
        "model": name, "flops_fraction": t.mean_flops_fraction,
        "heads_active": float(t.heads.float().mean()), "groups_active": float(t.groups.float().mean()),
        "tokens_kept": float(t.tokens.float().mean())} for name, t in traces.items()])
    return fig, table


# ---------------------------------------------------------------------------
# Notebook 04: speed-up and quality vs FLOPs
# ---------------------------------------------------------------------------

# DyDiT-XL on a V100 (paper): FLOPs fraction 84.33/118.69 and 57.88/118.69 -> measured speed-up.
PAPER_V100 = pd.DataFrame({"flops_ratio": [84.33 / 118.69, 57.88 / 118.69], "speedup": [1.32, 1.73],
                           "label": ["paper, λ = 0.7", "paper, λ = 0.5"]})


def load_bench(bench_dir: str | Path = BENCH_DIR) -> pd.DataFrame:
    """Every benchmark result in ``data/bench`` (JSON runs and CSV sweeps), one row each."""
    rows = []
    for path in sorted(Path(bench_dir).glob("*.json")):
        data = json.loads(path.read_text())
        rows.extend(data if isinstance(data, list) else [data])
    for path in sorted(Path(bench_dir).glob("*.csv")):
        rows.extend(pd.read_csv(path).to_dict("records"))
    if not rows:
        raise FileNotFoundError(f"no benchmark results in {bench_dir}: run python -m dydit_lab bench")
    keep = ["arch", "device", "batch_size", "target_ratio", "flops_ratio", "static_seconds",
            "dynamic_seconds", "masked_seconds", "speedup", "masked_speedup", "efficiency", "num_threads", "runs",
            "efficiency_runs", "speedup_runs", "static_pass_spread", "best_pass_efficiency_median",
            "best_pass_efficiency_runs"]
    # efficiency: speed-up / ideal; *_runs: each of --runs N separate runs; static_pass_spread: how much
    # identical work varied within the run, (max - min) / median of the static passes; best_pass_*: the
    # same read off each step's fastest forward (bench.run.best_pass; rows from before session 24 lack it)
    df = pd.DataFrame(rows)
    lists = lambda column: [json.loads(v) if isinstance(v, str) else v for v in df[column]]  # noqa: E731 (CSV: text)
    for column in ("efficiency_runs", "speedup_runs", "best_pass_efficiency_runs"):
        if column in df.columns:
            df[column] = [tuple(round(e, 3) for e in v) if isinstance(v, list) else None for v in lists(column)]
    if "static_pass_seconds" in df.columns:  # rows written before the bench recorded the spread
        derived = [pass_spread(v) if isinstance(v, list) and v else None
                   for v in lists("static_pass_seconds")]
        recorded = df["static_pass_spread"] if "static_pass_spread" in df.columns else pd.Series(None, index=df.index)
        df["static_pass_spread"] = recorded.where(recorded.notna(), pd.Series(derived, index=df.index, dtype=float))
    return df[[c for c in keep if c in df.columns]]


LAB_BENCH_COLUMNS = ["name", "device", "num_threads", "batch_size", "steps", "flops_ratio", "speedup",
                     "ideal_speedup", "efficiency", "masked_speedup", "runs", "static_pass_spread",
                     "best_pass_efficiency_median", "source"]


def load_lab_bench(bench_dir: str | Path = BENCH_DIR) -> pd.DataFrame:
    """The trained lab DyDiTs' measured speed-ups (``data/bench/lab/*.csv``), one row per
    checkpoint, device, thread count and batch: ``bench --checkpoint`` sweeps, and ``compare
    --timing-only`` re-timings (their DyDiT rows; batch = images timed, speed-up vs the static
    row of the same run). ``efficiency`` is the speed-up over the ideal 1 / FLOPs fraction."""
    frames = []
    for path in sorted((Path(bench_dir) / "lab").glob("*.csv")):
        table = pd.read_csv(path)
        if "efficiency" not in table:  # a compare re-timing
            table = table[table["ideal_speedup"] > 1].rename(
                columns={"flops_fraction": "flops_ratio", "timing_samples": "batch_size"})
            table = table.assign(efficiency=table["speedup"] / table["ideal_speedup"],
                                 num_threads=table.get("threads"), masked_speedup=float("nan"))
        frames.append(table.assign(source=path.name).reindex(columns=LAB_BENCH_COLUMNS))
    if not frames:
        raise FileNotFoundError(f"no lab benchmark in {Path(bench_dir) / 'lab'}: run python -m dydit_lab "
                                "bench --checkpoint data/checkpoints/DyDiT-lab-L-0.5.pt --sweep-batch 100 --steps 50")
    return pd.concat(frames, ignore_index=True)


FLOPS_TABLE_ARCHS = (("DiT-XL/2", 32), ("DiT-B/2", 32), ("DiT-S/2", 32), ("DiT-lab-L", 32), ("DiT-lab-S", 32))


def flops_table(archs=FLOPS_TABLE_ARCHS) -> pd.DataFrame:
    """Exact static GFLOPs per image per forward of the official and lab DiTs (DiT's MAC
    convention); ``input_size`` 32 is a 256 px image's latent for the official ones."""
    rows = []
    for arch, size in archs:
        cfg = get_config(arch, input_size=size)
        rows.append({"arch": arch, "input_size": size, "tokens": num_tokens(cfg),
                     "depth": cfg.depth, "hidden": cfg.hidden_size,
                     "gflops": round(analytic_flops(cfg)["total"] / 1e9, 4)})
    return pd.DataFrame(rows)


def speedup_figure(bench: pd.DataFrame | None = None, lab: pd.DataFrame | None = None):
    """Measured speed-up of sliced and masked DyDiT over the static DiT (``bench``: default
    :func:`load_bench`), against the ideal 1 / FLOPs fraction and the paper's V100 figures,
    with the trained lab DyDiTs (``lab``: :func:`load_lab_bench`) where given; and vs batch
    size where swept."""
    bench = load_bench() if bench is None else bench
    fig, (ax_ratio, ax_batch) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    plot_speedup_vs_ratio(bench, PAPER_V100, ax=ax_ratio, lab=lab)
    plot_speedup_vs_batch(bench, ax=ax_batch)
    return fig, bench


def quality_vs_flops_figure(results: str | Path = RESULTS_CSV):
    """FD-LeNet and class accuracy of every evaluated model vs its GFLOPs per sampling step."""
    table = quality_table(results)
    return plot_quality_vs_flops(table), table


QUALITY_FAMILIES = ("static", "static DiT-lab-S", "DyDiT", "FlexiDiT")  # a committed checkpoint's own path


def quality_table(results: str | Path = RESULTS_CSV) -> pd.DataFrame:
    """The committed checkpoints, each at its own 50-step sampling path, from ``compare``'s
    rows (static parent and lab-S, the DyDiTs, FlexiDiT with no coarse step), named by file."""
    table = strategy_table(results)  # raises, naming `compare`, when there are no strategy rows
    coarse = table.get("coarse_steps", pd.Series(0, index=table.index)).fillna(0)
    own_path = table["strategy"].isin(QUALITY_FAMILIES) & (table["steps"] == 50) & (coarse == 0)
    table = table[own_path].dropna(subset=["gflops_per_step", "fd_lenet"])
    if table.empty:
        raise FileNotFoundError(f"{results} has no compare rows of {QUALITY_FAMILIES} at 50 steps")
    return table.assign(name=[Path(c).stem for c in table["checkpoint"]]).sort_values("gflops_per_step")


# ---------------------------------------------------------------------------
# Notebook 05: static steps vs DyDiT vs FlexiDiT
# ---------------------------------------------------------------------------


def flexidit_schedule_table(arch: str = "DiT-lab-L", steps: int = 50, coarse_steps=(0, 12, 24, 36)):
    """Exact GFLOPs of FlexiDiT sampling runs with the first k of ``steps`` steps coarse."""

    rows = [schedule_flops(arch, None, k, steps) for k in coarse_steps]
    return pd.DataFrame([{"coarse_steps": r["coarse_steps"], "of_steps": r["total_steps"],
                          "patch": f'{r["coarse_patch"]} then {r["native_patch"]}',
                          "gflops_per_image": round(r["total_gflops"], 4),
                          "flops_fraction": round(r["flops_fraction"], 4)} for r in rows])


SAMPLE_STRATEGIES = ("static: 50 steps", "static: 20 steps", "DyDiT: lambda = 0.5", "caching: ToCa 10% every 3",
                     "FlexiDiT: k = 24 of 50 coarse")


def strategy_samples_figure(names=SAMPLE_STRATEGIES, num: int = 20, seed: int = 0, device="cpu"):
    """Digits 0-9 (``num`` // 10 each) from each named strategy, same seed and noise for all."""

    chosen = select(list(names))
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.9 * len(chosen) * num / 20), layout="constrained")
    for ax, strategy in zip(list(axes) if len(chosen) > 1 else [axes], chosen):
        model = strategy.model(CHECKPOINT_DIR, device)
        samples, labels = generate(model, num, steps=strategy.steps, seed=seed, device=device, progress=False)
        plot_sample_grid(samples, labels, nrow=10, ax=ax, title=display_name(strategy.name))
    return fig


def caching_drift_figure(specs: Mapping[str, str] | None = None, num_samples: int = 8, device="cpu"):
    """Each caching setting of the comparison (``specs``: setting -> spec, default all of
    :data:`~dydit_lab.evaluation.strategies.CACHING`) on the parent ``DiT-lab-L``: what it reused
    per step and how far its samples drift from the plain sampler's (notebook 05)."""
    drift = caching_drift(lab_model("DiT-lab-L", device), dict(specs or CACHING), num_samples=num_samples,
                          device=device, progress=False)
    return plot_caching_drift(drift), drift.summary


def flexidit_recipes_figure(results: str | Path = RESULTS_CSV):
    """FlexiDiT's fine-tuning recipes (their sweeps' rows in ``results``): quality vs GFLOPs per
    image over k coarse steps, medians and ranges over training seeds, beside the parent at
    10/20/30/50 DDIM steps. Returns (figure, one row per recipe and k)."""
    curves = recipe_curves(read_results(results))
    strategies = strategy_table(results)
    references = {"parent, fewer DDIM steps (10/20/30/50)": strategies[strategies["strategy"] == "static"]}
    table = pd.concat([c.assign(recipe=label) for label, c in curves.items()], ignore_index=True)
    columns = ["recipe", "coarse_steps", "runs", "gflops_per_image_median", "fd_lenet_median", "fd_lenet_min",
               "fd_lenet_max", "accuracy_median", "accuracy_min", "accuracy_max"]
    return plot_recipe_curves(curves, references), table[columns]


def dynamic_strategies_figure(results: str | Path = RESULTS_CSV):
    """Quality vs GFLOPs and vs wall-clock per image of every strategy row in ``results``
    (written by ``python -m dydit_lab compare``)."""
    table = strategy_table(results)
    return plot_strategies(table), table


# ---------------------------------------------------------------------------
# make figures
# ---------------------------------------------------------------------------

BUILDERS: dict[str, Callable] = {
    "samples_DiT-lab-S": lambda device: sample_grid_figure("DiT-lab-S", device=device),
    "samples_DiT-lab-L": lambda device: sample_grid_figure("DiT-lab-L", device=device),
    "loss_gap": lambda device: loss_gap_figure(device=device),
    "loss_maps": lambda device: loss_maps_figure(device=device),
    "router_schedules": lambda device: router_schedules_figure(device=device),
    "token_maps": lambda device: token_maps_figure(router_traces(device=device)),
    "speedup": lambda device: speedup_figure(lab=load_lab_bench()),
    "quality_vs_flops": lambda device: quality_vs_flops_figure(),
    "dynamic_strategies": lambda device: dynamic_strategies_figure(),
    "flexidit_recipes": lambda device: flexidit_recipes_figure(),
    "strategy_samples": lambda device: (strategy_samples_figure(device=device), None),
    "caching_drift": lambda device: caching_drift_figure(device=device),
}


def build_figures(out_dir: str | Path = FIGURES_DIR, only: list[str] | None = None,
                  device="cpu") -> dict[str, str]:
    """Write every figure (or ``only`` those) as PNG; returns name -> path or skip reason."""
    unknown = set(only or []) - set(BUILDERS)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; choose from {sorted(BUILDERS)}")
    done = {}
    for name, build in BUILDERS.items():
        if only and name not in only:
            continue
        try:
            fig, table = build(device)
        except FileNotFoundError as err:  # a checkpoint not trained yet: say so, go on
            done[name] = f"skipped: {err}"
            continue
        path = save_figure(fig, Path(out_dir) / f"{name}.png")
        if table is not None and len(table.columns) > 1:
            table.to_csv(Path(out_dir) / f"{name}.csv", index=False)
        done[name] = str(path)
        plt.close("all")
    return done


def describe(done: dict[str, str]) -> str:
    return json.dumps(done, indent=2)

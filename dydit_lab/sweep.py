"""Grids of training runs from a small spec file: train what is missing, resume what was
interrupted, evaluate what is done, and append one row per run (and sampling seed) to the
results table. Running a spec twice does nothing new.

A spec is TOML (paths relative to the repository root)::

    name = "lambda"                  # rows are named "lambda: target_ratio=0.5, seed=1"
    command = "finetune"             # train | finetune | flexi-finetune
    out = "runs/sweep-lambda"        # one sub-folder per run
    weights = "model"                # evaluate the online weights ("ema": the EMA; ["model", "ema"]: both)
    results = "data/results.csv"
    logs = "data/sweep-logs/lambda"  # optional: each run's small logs (routing.csv) copied here, to commit

    [config]                         # flags shared by every run (names as in the command's --help)
    parent = "data/checkpoints/DiT-lab-L.pt"

    [grid]                           # every combination is one run
    target_ratio = [0.5, 0.7]
    seed = [0, 1, 2]

    [evaluate]                       # options of `evaluate`
    num_samples = 1000
    sampling_seeds = [0]
    bootstrap = 500
    second_classifier = "data/lenet_mnist_seed1.pt"   # the default; "" for none
    coarse_steps = [0, 12, 24]       # FlexiDiT: one row per number of coarse steps (suffix ", k = 24 coarse")

``python -m dydit_lab sweep --spec data/sweeps/lambda.toml`` (``--dry-run`` lists the plan; ``--only seed=0``
keeps the grid points with that value, to run one seed first); in Python: ``run_spec(read_spec(path))``.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import export_checkpoint
from .evaluation.metrics import SampleEvaluator
from .evaluation.report import evaluate_checkpoint
from .evaluation.results import read_results, record_result
from .paths import CHECKPOINT_NAME, REPO_ROOT, RESULTS_CSV, SECOND_CLASSIFIER, display_path
from .training.dydit import FinetuneConfig, finetune
from .training.flexidit import FlexiFinetuneConfig, flexi_finetune
from .training.pretrain import TrainConfig, train

COMMANDS = {"train": (TrainConfig, train), "finetune": (FinetuneConfig, finetune),
            "flexi-finetune": (FlexiFinetuneConfig, flexi_finetune)}
EVALUATE_OPTIONS = {"num_samples", "steps", "method", "cfg_scale", "sampling_seeds", "bootstrap", "second_classifier",
                    "coarse_steps"}
PATH_FIELDS = {"parent", "init_from", "data"}  # config fields that name files


@dataclass
class SweepSpec:
    name: str
    command: str
    out: str
    config: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    weights: str | list = "model"
    results: str = str(RESULTS_CSV)
    logs: str = ""  # a folder for each run's small logs (KEPT_LOGS), so analyses work on a fresh clone


KEPT_LOGS = ("routing.csv",)  # per-run files small enough to commit (a checkpoint is not)


def keep_logs(run: "Run", logs: str | Path) -> list[Path]:
    """Copy the run folder's :data:`KEPT_LOGS` that exist to ``logs/<run folder name>/``."""
    copied = []
    for name in KEPT_LOGS:
        source = run.folder / name
        if source.exists():
            target = Path(_repo_path(str(logs))) / run.folder.name / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(target)
    return copied


@dataclass
class Run:
    """One grid point: its name, run folder and full config."""

    name: str
    folder: Path
    config: object
    values: dict


def _repo_path(value: str) -> str:
    path = Path(value)
    return str(path if path.is_absolute() else REPO_ROOT / path)


def read_spec(path: str | Path) -> SweepSpec:
    """Parse and check a spec file; every unknown key or flag is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no sweep spec at {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from err
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    missing = sorted({"name", "command", "out"} - set(raw))
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    spec = SweepSpec(**raw)
    if spec.command not in COMMANDS:
        raise ValueError(f"{path}: command must be one of {sorted(COMMANDS)}, got {spec.command!r}")
    weights = spec.weights if isinstance(spec.weights, list) else [spec.weights]
    if not weights or any(w not in ("model", "ema") for w in weights) or len(set(weights)) < len(weights):
        raise ValueError(f"{path}: weights must be 'model', 'ema' or a list of both, got {spec.weights!r}")
    flags = {f.name for f in dataclasses.fields(COMMANDS[spec.command][0])}
    bad = sorted((set(spec.config) | set(spec.grid)) - flags)
    if bad:
        raise ValueError(f"{path}: {bad} are not flags of {spec.command}")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list")
    bad_eval = sorted(set(spec.evaluate) - EVALUATE_OPTIONS)
    if bad_eval:
        raise ValueError(f"{path}: unknown evaluate options {bad_eval}; choose from {sorted(EVALUATE_OPTIONS)}")
    coarse = spec.evaluate.get("coarse_steps", [])
    if not isinstance(coarse, list) or not all(isinstance(k, int) and k >= 0 for k in coarse):
        raise ValueError(f"{path}: evaluate.coarse_steps must be a list of step counts >= 0, got {coarse!r}")
    second = spec.evaluate.get("second_classifier")
    if second and not Path(_repo_path(second)).is_file():
        raise FileNotFoundError(f"{path}: evaluate.second_classifier {second} not found")
    return spec


def parse_only(items: list[str] | None, spec: SweepSpec) -> dict:
    """``["seed=0", ...]`` as ``{"seed": 0}``: each value as the grid writes it (``lr=3e-4`` is the
    grid's 0.0003); a key outside the grid, or a value it does not list, is an error naming them."""
    only = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in spec.grid:
            raise ValueError(f"--only {item!r}: expected KEY=VALUE with KEY one of the grid's {sorted(spec.grid)}")
        matches = [v for v in spec.grid[key] if _same_value(v, value)]
        if not matches:
            raise ValueError(f"--only {item!r}: the grid's {key} takes {spec.grid[key]}")
        only[key] = matches[0]
    return only


def _same_value(grid_value, text: str) -> bool:
    if isinstance(grid_value, (int, float)) and not isinstance(grid_value, bool):
        try:
            return float(text) == float(grid_value)
        except ValueError:
            return False
    return str(grid_value) == text


def plan_runs(spec: SweepSpec, only: dict | None = None) -> list[Run]:
    """Every combination of the grid, in the order the grid lists them (those matching ``only``)."""
    config_cls = COMMANDS[spec.command][0]
    keys = list(spec.grid)
    runs = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        if any(values[k] != v for k, v in (only or {}).items()):
            continue
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        slug = "-".join(f"{k}{v}" for k, v in values.items()) or "run"
        folder = Path(_repo_path(spec.out)) / slug
        options = {**spec.config, **values}
        options = {k: _repo_path(v) if k in PATH_FIELDS and v != "mnist" and v else v for k, v in options.items()}
        config = config_cls(**options, out=str(folder), resume=(folder / CHECKPOINT_NAME).exists())
        runs.append(Run(f"{spec.name}: {label}" if label else spec.name, folder, config, values))
    return runs


def row_name(run: Run, sampling_seed: int, seeds: list[int], weights: str, all_weights: list[str],
             coarse: int | None = None) -> str:
    """The results row of one run, sampling seed, weights and (FlexiDiT) number of coarse
    steps (suffixes only where there is a choice; ``coarse`` None: no choice)."""
    name = run.name if len(all_weights) == 1 else f"{run.name}, {'EMA' if weights == 'ema' else 'online'} weights"
    name = name if coarse is None else f"{name}, k = {coarse} coarse"
    return name if len(seeds) == 1 else f"{name}, sampling seed {sampling_seed}"


# Config fields every row carries, in the grid or not: the chart's x, and the lr a spec may set
# in [config] (two sweeps that differ only there must not read alike).
RECORDED_CONFIG = ("target_ratio", "lr")


def _recorded_config(config) -> dict:
    return {k: getattr(config, k) for k in RECORDED_CONFIG if hasattr(config, k)}


def finished_step(folder: Path) -> int:
    """The step of a run folder's checkpoint (0 when there is none)."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def run_spec(spec: SweepSpec, dry_run: bool = False, device="cpu", log=print, only: dict | None = None) -> list[dict]:
    """Train, evaluate and record every run of ``spec`` (matching ``only``) that has no results row yet."""
    results = Path(_repo_path(spec.results))
    done = {r["name"] for r in read_results(results)}
    options = dict(spec.evaluate)
    seeds = list(options.pop("sampling_seeds", [0]))
    options.setdefault("bootstrap", 500)
    second = options.pop("second_classifier", str(SECOND_CLASSIFIER))
    coarse_steps = options.pop("coarse_steps", None) or [None]  # None: the model's own path
    all_weights = spec.weights if isinstance(spec.weights, list) else [spec.weights]
    evaluator = None
    rows = []
    for run in plan_runs(spec, only):
        todo = [(w, s, k) for w in all_weights for s in seeds for k in coarse_steps
                if row_name(run, s, seeds, w, all_weights, k) not in done]
        step = finished_step(run.folder)
        state = "done" if not todo else ("trained" if step >= run.config.steps else
                                          f"resume at {step}" if step else "train")
        log(f"{run.name}: {state}")
        if dry_run:
            continue
        if not todo:
            if spec.logs:  # e.g. a spec that gained `logs` after its runs were done
                keep_logs(run, spec.logs)
            continue
        if step < run.config.steps:
            COMMANDS[spec.command][1](dataclasses.replace(run.config, resume=step > 0))
        evaluator = evaluator or SampleEvaluator.from_default(
            device=device, second=_repo_path(second) if second else None)
        for weights, seed, coarse in todo:
            exported = export_checkpoint(run.folder / CHECKPOINT_NAME, run.folder / f"{weights}.pt",
                                         weights=weights)
            metrics = evaluate_checkpoint(exported, seed=seed, evaluator=evaluator, device=device,
                                          progress=False, coarse_steps=coarse, **options)
            # Grid values first: a grid "seed" is the training seed (recorded as train_seed), and
            # must not overwrite the sampling seed in the row's "seed".
            row = {**_recorded_config(run.config), **run.values, **metrics,
                   "name": row_name(run, seed, seeds, weights, all_weights, coarse),
                   "sweep": spec.name, "weights": weights, "run_folder": display_path(run.folder)}
            record_result(results, row)
            rows.append(row)
            log(f"  {weights} weights, sampling seed {seed}{'' if coarse is None else f', k = {coarse} coarse'}: FD-LeNet {metrics['fd_lenet']:.2f} "
                f"[{metrics.get('fd_lenet_lo', float('nan')):.2f}, {metrics.get('fd_lenet_hi', float('nan')):.2f}], "
                f"accuracy {metrics['accuracy']:.3f}")
        if spec.logs:
            keep_logs(run, spec.logs)
    return rows

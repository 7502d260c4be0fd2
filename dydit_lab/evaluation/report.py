"""Reports of one model or checkpoint: what sampling it gives (quality, compute, wall-clock),
a results row scored again with both classifiers, and what a preset costs by formula and by
fvcore's tracer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import flops
from ..checkpoints import read_checkpoint
from ..data import mnist_split
from ..models.configs import DiTConfig, get_config
from ..models.dit import DiT
from ..paths import REPO_ROOT, display_path
from .metrics import SampleEvaluator
from .results import read_results, record_result
from .sampling import generate, sampling_model, timed_generate


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
    the samples (the rounds are recorded as ``bootstrap``). The default evaluator has a second
    classifier: its scores of the same samples come as ``fd_lenet_alt`` and ``accuracy_alt``
    (with intervals), and its file as ``classifier_alt``.
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
        **({"complete_model": True, "complete_from_t": complete_from_t} if complete_model else {}),
        # classifier-free guidance runs the conditional and unconditional halves each step
        "gflops_per_image": cost["gflops_per_step"] * steps * (1 if cfg_scale == 1 else 2),
        "seconds_per_image": seconds, "device": device.type,
        "threads": torch.get_num_threads(), "bootstrap": bootstrap, **classifier_files(evaluator),
        **evaluator.score(samples, labels, bootstrap=bootstrap, seed=seed),
    }


def classifier_files(evaluator: SampleEvaluator) -> dict:
    """``classifier_alt``: the second classifier's file, for a row scored with one."""
    return {} if evaluator.second is None else {"classifier_alt": evaluator.second_file}


# ---------------------------------------------------------------------------
# Rows of the results table scored again (e.g. with the second classifier)
# ---------------------------------------------------------------------------


def recorded_settings(row: dict) -> dict:
    """The sampling settings a results row records, as keyword arguments of the sampling
    (defaults where a row predates a column: seed 0, 500 bootstrap rounds if it has intervals)."""
    def value(key, kind, default):
        raw = row.get(key)
        return default if raw is None or raw == "" else kind(raw)

    intervals = row.get("fd_lenet_lo") not in (None, "")
    return {"num_samples": value("num_samples", int, 1000), "steps": value("steps", int, 50),
            "method": value("method", str, "ddim"), "cfg_scale": value("cfg_scale", float, 1.0),
            "seed": value("seed", int, 0), "coarse_steps": value("coarse_steps", int, None),
            "cache": value("cache", str, None),
            "complete_model": value("complete_model", lambda v: str(v) == "True", False),
            "complete_from_t": value("complete_from_t", int, 0),
            "bootstrap": value("bootstrap", int, 500 if intervals else 0)}


def rescore_row(row: dict, evaluator: SampleEvaluator, device="cpu", progress: bool = False,
                tolerance: float = 1e-3) -> dict:
    """``row`` of the results table with its quality columns scored again by ``evaluator``.

    The samples are drawn again from the recorded checkpoint with the recorded settings
    (:func:`recorded_settings`; ``real-val``: the real validation digits), so a second
    classifier judges the very images the row was scored on. Compute, timing and every other
    column are kept. Raises ``ValueError`` naming the row when the main FD-LeNet comes out more
    than ``tolerance`` (relative) away from the recorded one: the row's settings do not
    reproduce its samples. A missing checkpoint is a ``FileNotFoundError`` naming it.
    """
    name, settings = row.get("name", "?"), recorded_settings(row)
    bootstrap, seed = settings.pop("bootstrap"), settings["seed"]
    if row.get("checkpoint") == "real-val":
        images, labels = mnist_split("val").tensors
    else:
        path = Path(row.get("checkpoint") or "")
        path = path if path.is_absolute() else REPO_ROOT / path
        if not row.get("checkpoint") or not path.is_file():
            raise FileNotFoundError(f"row {name!r}: checkpoint {path} not found")
        model = sampling_model(path, settings["steps"], settings["coarse_steps"], settings["complete_model"],
                               device, complete_from_t=settings["complete_from_t"], cache=settings["cache"])
        images, labels = generate(model, settings["num_samples"], steps=settings["steps"], method=settings["method"],
                                  cfg_scale=settings["cfg_scale"], seed=seed, device=device, progress=progress)
    metrics = evaluator.score(images, labels, bootstrap=bootstrap, seed=seed)
    recorded = float(row["fd_lenet"])
    if abs(metrics["fd_lenet"] - recorded) > tolerance * abs(recorded):
        raise ValueError(f"row {name!r}: FD-LeNet {metrics['fd_lenet']:.4f} again, recorded {recorded:.4f}; "
                         f"its recorded settings do not reproduce its samples (not re-scored)")
    return {**row, **metrics, "bootstrap": bootstrap, **classifier_files(evaluator)}


def rescore_results(results: str | Path, names: list[str], evaluator: SampleEvaluator | None = None,
                    device="cpu", progress: bool = True, tolerance: float = 1e-3, log=print) -> list[dict]:
    """Score the rows ``names`` of ``results`` again (:func:`rescore_row`) and upsert each as it
    is done. Rows that cannot be re-scored are left as they are and named in one
    ``ValueError`` at the end; unknown names fail before any sampling."""
    rows = {r["name"]: r for r in read_results(results)}
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise ValueError(f"no rows named {unknown} in {results}")
    evaluator = evaluator or SampleEvaluator.from_default(device=device)
    done, failed = [], []
    for name in names:
        try:
            row = rescore_row(rows[name], evaluator, device=device, progress=progress, tolerance=tolerance)
        except (ValueError, FileNotFoundError) as err:
            failed.append(str(err))
            continue
        record_result(results, row)
        done.append(row)
        log(f"{name}: FD-LeNet {float(row['fd_lenet']):.2f}, second classifier "
            f"{float(row.get('fd_lenet_alt', 'nan')):.2f}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(names)} row(s) not re-scored: " + "; ".join(failed))
    return done


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

"""Ways to spend less compute per generated image, compared at equal footing (notebook 05).

The families share one large parent model, ``DiT-lab-L``:

- **static**: the parent itself, with fewer sampling steps (and **static DiT-lab-S**, the small
  model at the same step counts);
- **DyDiT**: the parent fine-tuned with timestep-wise width and token routers (one
  checkpoint per FLOPs target lambda), also at fewer sampling steps (**DyDiT + fewer steps**);
- **FlexiDiT**: the parent with coarse-only low-rank adapters (its native path is the parent,
  weight for weight), sampled with its first k of S steps at the coarse patch size;
- **caching**: the parent sampled with a training-free feature-caching policy
  (:mod:`dydit_lab.caching`: FORA, FBCache, DBCache, TeaCache, ToCa, Learning-to-Cache), each
  at a few settings; **DyDiT + caching**: DyDiT lambda = 0.5 with a caching policy on top.

:func:`compare_strategies` evaluates each :class:`Strategy` with the same classifier, sample
count and seeds, measures GFLOPs per image and CPU wall-clock, and upserts one row per
strategy into ``data/results.csv`` (columns ``strategy`` and ``setting`` mark them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..paths import CHECKPOINT_DIR, RESULTS_CSV
from .metrics import SampleEvaluator
from .report import evaluate_checkpoint
from .results import read_results, record_result
from .sampling import sampling_model, timed_generate

RESULTS = RESULTS_CSV  # the default results file


@dataclass(frozen=True)
class Strategy:
    """One sampling setting of one checkpoint."""

    family: str  # "static", "DyDiT", "FlexiDiT", "caching", ... (see STRATEGIES)
    setting: str  # what distinguishes it inside its family, e.g. "20 steps", "lambda = 0.5"
    checkpoint: str  # file name under data/checkpoints/
    steps: int = 50
    coarse_steps: int | None = None  # FlexiDiT: first k of ``steps`` at the coarse patch
    cache: str | None = None  # a feature-caching spec (dydit_lab.caching.parse_cache_spec)

    @property
    def name(self) -> str:
        return f"{self.family}: {self.setting}"

    def model(self, checkpoint_dir: str | Path = CHECKPOINT_DIR, device="cpu"):
        """The model to sample this strategy with (see :func:`~dydit_lab.evaluation.sampling_model`)."""
        return sampling_model(Path(checkpoint_dir) / self.checkpoint, self.steps, self.coarse_steps,
                              device=device, cache=self.cache)


# The caching settings on the parent: 3-4 per policy, spanning from little reuse to much (the
# thresholds are set per policy: their distances live on different scales; TeaCache's polynomial
# maps to changes of the eps output, which move little per step). TeaCache's polynomial and
# the L2C router were fitted on the parent by `calibrate-teacache` and `train-cache-router`
# (files in data/caching/).
TEACACHE = "teacache-DiT-lab-L.json"
L2C_ROUTER = "l2c-DiT-lab-L-50.pt"
CACHING = (
    *((f"FORA N = {n}", f"fora:{n}") for n in (2, 3, 4)),
    *((f"FBCache {r}", f"fbcache:{r}") for r in (0.05, 0.1, 0.2)),
    *((f"DBCache F1B1 {r}", f"dbcache:{r},first=1,last=1") for r in (0.05, 0.1, 0.2)),
    *((f"TeaCache {r}", f"teacache:{r},coef={TEACACHE}") for r in (0.003, 0.006, 0.01, 0.02)),
    *((f"ToCa {f:.0%} every {n}", f"toca:{f},interval={n}") for f, n in ((0.3, 2), (0.3, 3), (0.1, 3), (0.1, 5))),
    *((f"L2C {r}", f"l2c:{r},router={L2C_ROUTER}") for r in (0.1, 0.5, 0.9)),
)
# DyDiT with a caching policy on top: the one that scored best on the parent near half the FLOPs
# in a 200-sample check (ToCa; FORA N = 2, the simplest, for reference).
DYDIT_CACHING = (("lambda = 0.5 + ToCa 30% every 3", "toca:0.3,interval=3"), ("lambda = 0.5 + FORA N = 2", "fora:2"))

STRATEGIES: tuple[Strategy, ...] = (
    *(Strategy("static", f"{s} steps", "DiT-lab-L.pt", steps=s) for s in (10, 20, 30, 50)),
    # The small model at the same step counts: the premise (the large one is worth its compute).
    *(Strategy("static DiT-lab-S", f"{s} steps", "DiT-lab-S.pt", steps=s) for s in (10, 20, 30, 50)),
    *(Strategy("DyDiT", f"lambda = {lam}", f"DyDiT-lab-L-{lam}.pt") for lam in ("0.7", "0.5")),
    # Does dynamic width add to fewer sampling steps?
    *(Strategy("DyDiT + fewer steps", f"lambda = 0.5, {s} steps", "DyDiT-lab-L-0.5.pt", steps=s) for s in (20, 30)),
    # The adapter recipe: the every-weight fine-tune degraded the native path (notebook 05).
    *(Strategy("FlexiDiT", f"k = {k} of 50 coarse", "FlexiDiT-lab-L-adapters.pt", coarse_steps=k)
      for k in (0, 12, 24, 36)),
    *(Strategy("caching", setting, "DiT-lab-L.pt", cache=spec) for setting, spec in CACHING),
    *(Strategy("DyDiT + caching", setting, "DyDiT-lab-L-0.5.pt", cache=spec) for setting, spec in DYDIT_CACHING),
)


def select(names: list[str] | None = None) -> list[Strategy]:
    """The strategies whose name or family is in ``names`` (all when None); unknown names fail."""
    if not names:
        return list(STRATEGIES)
    known = {s.name for s in STRATEGIES} | {s.family for s in STRATEGIES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {sorted(known)}")
    return [s for s in STRATEGIES if s.name in names or s.family in names]


def time_strategies(chosen: list[Strategy], checkpoint_dir: str | Path = CHECKPOINT_DIR, rounds: int = 3,
                    num_samples: int = 100, device="cpu", progress: bool = True) -> dict[str, float]:
    """Median sampling seconds per image of each strategy, measured round-robin.

    A shared machine drifts over minutes; timing every strategy once per round, interleaved,
    and taking the median over rounds keeps that drift out of the comparison (timing each
    strategy in one block, one after another, put two identical workloads 1.5x apart here).
    """
    models = {s.name: s.model(checkpoint_dir, device) for s in chosen}
    times: dict[str, list[float]] = {s.name: [] for s in chosen}
    for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress):
        for s in chosen:
            *_, seconds = timed_generate(models[s.name], num_samples, steps=s.steps, device=device,
                                         batch_size=num_samples, progress=False)
            times[s.name].append(seconds)
    return {name: float(torch.tensor(v).median()) for name, v in times.items()}


def compare_strategies(names: list[str] | None = None, num_samples: int = 1000, seed: int = 0,
                       checkpoint_dir: str | Path = CHECKPOINT_DIR, results: str | Path | None = RESULTS,
                       timing_rounds: int = 3, timing_samples: int = 100, quality: bool = True,
                       bootstrap: int = 500, device="cpu", progress: bool = True) -> pd.DataFrame:
    """Evaluate each selected strategy; upsert rows into ``results`` (None: don't write).

    Quality and compute come from :func:`~dydit_lab.evaluation.report.evaluate_checkpoint`
    (``num_samples`` each, same seeds, 95 % intervals from ``bootstrap`` resamples of the
    generated samples, 0: none); ``seconds_per_image`` is then replaced by the
    round-robin median of :func:`time_strategies`. ``quality=False`` only re-times the
    strategies and updates their existing rows. Wall-clock is only comparable between rows
    timed together (same machine, same thread count, recorded in ``threads``).
    """
    chosen = select(names)
    missing = sorted({s.checkpoint for s in chosen if not (Path(checkpoint_dir) / s.checkpoint).exists()})
    if missing:
        raise FileNotFoundError(f"missing checkpoints in {checkpoint_dir}: {missing} (README, 'Lab models')")
    if quality:
        evaluator = SampleEvaluator.from_default(device=device)
        rows = []
        for strategy in tqdm(chosen, desc="strategies", disable=not progress):
            metrics = evaluate_checkpoint(Path(checkpoint_dir) / strategy.checkpoint, num_samples=num_samples,
                                          steps=strategy.steps, seed=seed, coarse_steps=strategy.coarse_steps,
                                          cache=strategy.cache, evaluator=evaluator, device=device, progress=False,
                                          bootstrap=bootstrap)
            rows.append({"name": strategy.name, "strategy": strategy.family, "setting": strategy.setting,
                         **metrics})
    else:
        if results is None:
            raise ValueError("quality=False updates existing rows: give results")
        existing = {r["name"]: r for r in read_results(results)}
        absent = [s.name for s in chosen if s.name not in existing]
        if absent:
            raise ValueError(f"no rows to re-time for {absent} in {results}: run with quality first")
        rows = [existing[s.name] for s in chosen]
    seconds = time_strategies(chosen, checkpoint_dir, timing_rounds, timing_samples, device, progress)
    for row in rows:
        row.update(seconds_per_image=seconds[row["name"]], timing_rounds=timing_rounds,
                   threads=torch.get_num_threads())
        if results is not None:
            record_result(results, row)
    table = pd.DataFrame(rows)
    numeric = ["gflops_per_image", "seconds_per_image", "fd_lenet", "accuracy"]
    table[numeric] = table[numeric].apply(pd.to_numeric)
    return table


POLICY_NAMES = {"fora": "FORA", "fbcache": "FBCache", "dbcache": "DBCache", "teacache": "TeaCache",
                "toca": "ToCa", "l2c": "L2C"}


def policy_name(spec: str) -> str:
    """The policy a cache spec names, as tables and figures write it ("fora:2" -> "FORA")."""
    name = spec.split(":")[0].split(",")[0].strip().lower()
    return POLICY_NAMES.get(name, name)


def series_name(family: str, cache) -> str:
    """The curve a row belongs to: its family, split by caching policy (``caching: FORA``), so
    that settings of different policies are never joined into one line."""
    if not isinstance(cache, str) or not cache:
        return family
    return f"{family}: {policy_name(cache)}"


def strategy_table(results: str | Path = RESULTS) -> pd.DataFrame:
    """The strategy rows of ``results`` with numeric columns and their ``series`` (see
    :func:`series_name`), cheapest first per series."""
    table = pd.read_csv(results)
    if "strategy" not in table.columns or table["strategy"].isna().all():
        raise FileNotFoundError(f"{results} has no strategy rows: run python -m dydit_lab compare")
    table = table.dropna(subset=["strategy"]).copy()
    caches = table["cache"] if "cache" in table.columns else pd.Series(None, index=table.index)
    table["series"] = [series_name(f, c) for f, c in zip(table["strategy"], caches)]
    return table.sort_values(["strategy", "series", "gflops_per_image"]).reset_index(drop=True)


def pareto_front(cost, quality, higher_is_better: bool = False) -> list[int]:
    """Positions of the points no other point beats on both cost (lower) and quality, by cost."""
    points = sorted(range(len(cost)), key=lambda i: (cost[i], -quality[i] if higher_is_better else quality[i]))
    front, best = [], None
    for i in points:
        q = quality[i] if higher_is_better else -quality[i]
        if best is None or q > best:
            front.append(i)
            best = q
    return front

"""Where the wall-clock time goes, stage by stage: each stage of the static and the sliced
forward (embedding, adaLN modulation, norms, attention, token routing, MLP, final layer) timed
on its own in a real pass, against what it would cost if it shrank exactly with its routing.

``torch.profiler`` sums op self times, which leave out Python between the ops and, on small
ops, carry the profiler's own overhead; this clock times the stages as they run, so the
stages plus "other" (the attention's residual add, unpatchify, Python between the stages) add
up to the measured pass.

``python -m dydit_lab bench --checkpoint data/checkpoints/DyDiT-lab-L-0.5.pt --batch-size 100 --steps 50 --profile stages``
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from ..models.dit import DiT
from ..models.dydit import DyDiT
from ..models.dydit_block import DyDiTBlock
from .run import _sync, mean_flops_fraction, time_paths
from .workload import BenchInputs

# stage -> what its sliced cost should scale with ("fixed": not routed; "extra": sliced only)
STAGE_SCALING = {
    "embedding": "fixed", "width plan": "extra", "adaLN modulation": "fixed", "norm1 + modulate": "fixed",
    "attention": "heads", "token routing": "extra", "norm2 + modulate": "tokens", "MLP": "mlp",
    "MLP residual": "tokens", "final layer": "fixed", "other": "fixed",
}

# (stage, attribute of a block, of its attention or MLP module, or of the model) timed for each
_BLOCK_STAGES = (("adaLN modulation", "modulation"), ("norm1 + modulate", "attention_input"),
                 ("norm2 + modulate", "mlp_input"), ("MLP residual", "mlp_residual"))
_SLICED_STAGES = (("attention", "sliced_attention"), ("token routing", "route_tokens"),
                  ("norm2 + modulate", "kept_mlp_input"), ("MLP", "sliced_mlp"), ("MLP residual", "kept_mlp_residual"))


class StageTotals:
    """Seconds per path and stage (``totals[path][stage]``), filled by :func:`stage_clocks`;
    ``path`` names the path whose forward runs now (:func:`.run.time_paths` sets it)."""

    def __init__(self):
        self.path = "static"
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, defaultdict] = defaultdict(lambda: defaultdict(float))


@contextmanager
def stage_clocks(models, device: torch.device):
    """While open, every stage method of ``models`` adds its seconds to the yielded
    :class:`StageTotals` under its current path. On CUDA each stage waits for its kernels,
    which serialises the launches: read CUDA stage times as an upper bound."""
    clocks, patched = StageTotals(), []

    def clock(owner, attr, stage):
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            clocks.totals[clocks.path][stage] += time.perf_counter() - start
            return out

        setattr(owner, attr, timed)  # an instance attribute shadows the method until deleted
        patched.append((owner, attr))

    for model in models:
        clock(model, "embed", "embedding")
        clock(model, "plan_conditioning", "adaLN modulation")  # a pass's planned modulation, when planned
        clock(model.final_layer, "forward", "final layer")
        if isinstance(model, DyDiT):
            clock(model, "plan_timesteps", "width plan")
        for block in model.blocks:
            clock(block.attn, "forward", "attention")
            clock(block.mlp, "forward", "MLP")
            for stage, attr in _BLOCK_STAGES + (_SLICED_STAGES if isinstance(block, DyDiTBlock) else ()):
                clock(block, attr, stage)
    try:
        yield clocks
    finally:
        for owner, attr in patched:
            delattr(owner, attr)


def routed_fractions(routings) -> dict:
    """Mean share of heads on, of tokens kept and of MLP elements run (groups x tokens) over
    the sliced passes' routings: what each routed stage should scale with."""
    heads = torch.stack([r.heads.float().mean() for r in routings]).mean()
    tokens = torch.stack([r.tokens.float().mean() for r in routings]).mean()
    mlp = torch.stack([(r.groups.float().mean(-1) * r.tokens.float().mean(-1)).mean() for r in routings]).mean()
    return {"heads": float(heads), "tokens": float(tokens), "mlp": float(mlp), "fixed": 1.0, "extra": 0.0}


@torch.no_grad()
def stage_breakdown(dit: DiT, dydit: DyDiT, inputs: BenchInputs, device: torch.device, repeats: int = 3) -> dict:
    """Seconds per sampling step of every stage of the static ``dit`` and the sliced ``dydit``,
    timed inside the bench's own passes (:func:`.run.time_paths`: warm-up, then ``repeats``
    passes with the static, sliced and masked paths interleaved per step), each stage's
    sliced/static ratio and its ideal: the static stage times the fraction it is routed by
    (heads, kept tokens, MLP elements; 1 if not routed; 0 for the sliced path's own extras).
    Returns per-stage rows and three totals: the FLOPs-ideal efficiency (``efficiency``), the
    best a path that shrank every routed stage exactly could reach against the FLOPs ideal
    (``stage_ceiling``), and the sliced pass against that stage ideal (``of_stage_ideal``);
    ``masked_ms`` is the masked path's step (its stages are not broken down)."""
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    models = {id(m): m for m in (getattr(dit, "model", dit), dydit)}  # a complete model wraps the DyDiT
    with stage_clocks(models.values(), device) as clocks:
        timing = time_paths(dit, dydit, inputs, repeats, device, observer=clocks)
    per_step = len(inputs.x) * repeats
    ms = {name: {k: 1e3 * v / per_step for k, v in clocks.totals[name].items()} for name in ("static", "sliced")}
    for name, part in ms.items():
        part["total"] = 1e3 * sum(timing["times"][name]) / per_step
        part["other"] = part["total"] - sum(v for k, v in part.items() if k != "total")
    routings = [routing for _, routing in timing["outputs"]["sliced"]]  # every pass routes alike
    fractions = routed_fractions(routings)
    rows = []
    for stage, scaling in STAGE_SCALING.items():
        static, sliced = ms["static"].get(stage, 0.0), ms["sliced"].get(stage, 0.0)
        rows.append({"stage": stage, "scales_with": scaling, "fraction": fractions[scaling],
                     "static_ms": static, "sliced_ms": sliced, "ideal_ms": static * fractions[scaling]})
    flops = mean_flops_fraction(dydit.config, routings)
    static_total, sliced_total = ms["static"]["total"], ms["sliced"]["total"]
    stage_ideal = sum(row["ideal_ms"] for row in rows)
    return {"kind": "stages", "stages": rows, "fractions": fractions, "flops_fraction": flops,
            "static_ms": static_total, "sliced_ms": sliced_total, "stage_ideal_ms": stage_ideal,
            "masked_ms": 1e3 * sum(timing["times"]["masked"]) / per_step,
            "efficiency": flops * static_total / sliced_total,
            "stage_ceiling": flops * static_total / stage_ideal, "of_stage_ideal": stage_ideal / sliced_total}


def describe_stages(result: dict) -> str:
    """A table of the stages (ms per step: static, sliced, ideal) and the three totals."""
    f = result["fractions"]
    lines = [f"routed fractions: heads {f['heads']:.3f}, kept tokens {f['tokens']:.3f}, "
             f"MLP elements {f['mlp']:.3f}; FLOPs fraction {result['flops_fraction']:.3f}",
             f"{'stage':<18} {'scales with':<11} {'static ms':>10} {'sliced ms':>10} {'ratio':>6} {'ideal ms':>9}"]
    for row in result["stages"]:
        ratio = f"{row['sliced_ms'] / row['static_ms']:.2f}" if row["static_ms"] > 0 else "-"
        lines.append(f"{row['stage']:<18} {row['scales_with']:<11} {row['static_ms']:>10.2f} "
                     f"{row['sliced_ms']:>10.2f} {ratio:>6} {row['ideal_ms']:>9.2f}")
    lines += [f"{'total':<30} {result['static_ms']:>10.2f} {result['sliced_ms']:>10.2f} "
              f"{result['sliced_ms'] / result['static_ms']:>6.2f} {result['stage_ideal_ms']:>9.2f}",
              f"of the FLOPs ideal: {result['efficiency']:.3f}; a path that shrank every routed stage exactly "
              f"would reach {result['stage_ceiling']:.3f}; the sliced pass is {result['of_stage_ideal']:.3f} "
              f"of that stage ideal"]
    return "\n".join(lines)

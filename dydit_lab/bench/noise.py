"""Can this machine read the bench? A control whose answer is known: the static model's forward
once against the same forward twice in a row, timed exactly as the bench times its paths
(:func:`.run.time_interleaved`). The true ratio is 2, about the ratio of a static to a sliced
pass at half the FLOPs, so each estimator's error on it is its error on a 2x speed-up:

* ``median_pass_ratio``: the bench's ``speedup`` (median pass of each path);
* ``best_pass_ratio``: its ``best_pass_speedup`` (:func:`.run.best_pass`). Contention only adds
  time, but a short forward finds a quiet moment more often than a long one, so on a bursty
  machine this estimator can favour the shorter path. A ratio away from 2 says how far either
  estimator errs on this machine now; repeat the control, since the error moves with the host.

``python -m dydit_lab bench --arch DiT-XL/2 --batch-size 1 --steps 2 --repeats 5 --profile noise``
"""

from __future__ import annotations

import statistics

import torch

from ..models.dit import DiT
from .run import best_pass, pass_spread, time_interleaved
from .workload import BenchInputs

TRUE_RATIO = 2.0


@torch.no_grad()
def duration_control(dit: DiT, inputs: BenchInputs, device: torch.device, repeats: int = 5) -> dict:
    """Time ``dit`` once and twice per step, interleaved, and read the known ratio of 2 with the
    bench's two estimators (their relative errors in ``*_error``) and the single forwards'
    :func:`.run.pass_spread`."""
    dit.eval()

    def twice(x, t, y):
        dit(x, t, y)
        return dit(x, t, y)

    timing = time_interleaved({"once": dit, "twice": twice}, inputs, repeats, device)
    times, steps = timing["times"], timing["step_seconds"]
    median_ratio = statistics.median(times["twice"]) / statistics.median(times["once"])
    best_ratio = best_pass(steps["twice"]) / best_pass(steps["once"])
    forwards = [s for one_pass in steps["once"] for s in one_pass]
    return {"kind": "noise", "batch_size": len(inputs.x[0]), "steps": len(inputs.x), "repeats": repeats,
            "true_ratio": TRUE_RATIO, "median_pass_ratio": median_ratio, "best_pass_ratio": best_ratio,
            "median_pass_error": median_ratio / TRUE_RATIO - 1, "best_pass_error": best_ratio / TRUE_RATIO - 1,
            "once_pass_spread": pass_spread(times["once"]), "once_forward_seconds": forwards}


def describe_noise(result: dict) -> str:
    """Two lines: the spread of identical work and what each estimator made of the known ratio."""
    forwards = result["once_forward_seconds"]
    return "\n".join([
        f"one static forward (batch {result['batch_size']}): {min(forwards):.3f}-{max(forwards):.3f} s, "
        f"median {statistics.median(forwards):.3f} s; passes of identical work spread {result['once_pass_spread']:.0%}",
        f"a known ratio of {result['true_ratio']:g} read {result['median_pass_ratio']:.3f} by the median pass "
        f"({result['median_pass_error']:+.1%}) and {result['best_pass_ratio']:.3f} by the best pass "
        f"({result['best_pass_error']:+.1%}): errors the bench's speed-ups carry on this machine now"])

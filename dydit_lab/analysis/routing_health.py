"""Healthy vs collapsing fine-tunes, read from the per-block routing log a DyDiT fine-tune writes
(``routing.csv`` in its run folder, see ``dydit_lab.training.dydit.ROUTING_LOG_FIELDS``).

The failure modes a seed can fall into, each as one number per run:

- **a block down to one head** (or group): the fewest heads any sample kept, across blocks;
  the step it first happened;
- **token routers stuck**: blocks whose kept-token fraction is all or nothing (<= 5 % or >= 95 %);
- **no timestep dependence**: the kept-token gap between noisy and clean samples, averaged over blocks.

``health_table({"seed 0": "runs/sweep-lambda/target_ratio0.5-seed0", ...}, num_heads=8)`` gives one
row per run, to be set next to each run's FD.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

STUCK_LOW, STUCK_HIGH = 0.05, 0.95


def read_routing_log(run: str | Path) -> pd.DataFrame:
    """A run folder's ``routing.csv`` (or the file itself) as numbers."""
    path = Path(run)
    path = path / "routing.csv" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no routing log at {path} (fine-tunes write one with --routing-log-every > 0)")
    return pd.read_csv(path)


def run_health(log: pd.DataFrame, num_heads: int, last_steps: int = 200) -> dict:
    """The collapse indicators of one run (see the module docstring) of a model with
    ``num_heads`` heads per block; end-state values average its last ``last_steps`` logged steps."""
    if log.empty:
        raise ValueError("the routing log is empty")
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    end = log[log["step"] > log["step"].max() - last_steps]
    per_block = end.groupby("block").mean(numeric_only=True)
    one_head = log.loc[log["heads_min"] <= 1.0 / num_heads + 1e-6, "step"]
    return {
        "steps_logged": int(log["step"].max()),
        "fewest_heads": float(end["heads_min"].min()),
        "fewest_groups": float(end["groups_min"].min()),
        "first_step_one_head": int(one_head.min()) if len(one_head) else None,
        "blocks_tokens_stuck": int(((per_block["tokens"] <= STUCK_LOW) | (per_block["tokens"] >= STUCK_HIGH)).sum()),
        "blocks": int(log["block"].nunique()),
        "tokens": float(per_block["tokens"].mean()),
        "heads": float(per_block["heads"].mean()),
        "groups": float(per_block["groups"].mean()),
        "tokens_noisy_minus_clean": float((per_block["tokens_high_t"] - per_block["tokens_low_t"]).mean()),
    }


def health_table(runs: dict[str, str | Path], num_heads: int, last_steps: int = 200) -> pd.DataFrame:
    """:func:`run_health` of each run folder, one row per run (indexed by its label)."""
    if not runs:
        raise ValueError("give at least one run folder")
    rows = {label: run_health(read_routing_log(path), num_heads, last_steps) for label, path in runs.items()}
    return pd.DataFrame.from_dict(rows, orient="index")

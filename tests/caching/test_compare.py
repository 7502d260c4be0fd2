"""The caching strategies in the comparison: rows with their spec and the FLOPs of what ran."""

import pytest

from dydit_lab.caching import CachedModel
from dydit_lab.evaluation.metrics import SampleEvaluator
from dydit_lab.evaluation.sampling import sampling_model
from dydit_lab.evaluation.strategies import compare_strategies, select, strategy_table


def test_compare_evaluates_caching_strategies(strategy_checkpoints, tmp_path, evaluator, monkeypatch):
    monkeypatch.setattr(SampleEvaluator, "from_default", lambda device="cpu": evaluator)  # the session's judge
    names = ["caching: FORA N = 2", "DyDiT + caching: lambda = 0.5 + FORA N = 2"]
    assert all(isinstance(s.model(strategy_checkpoints), CachedModel) for s in select(names))
    results = tmp_path / "results.csv"
    table = compare_strategies(names, num_samples=10, checkpoint_dir=strategy_checkpoints, results=results,
                               timing_rounds=1, timing_samples=4, progress=False)
    assert list(table["name"]) == names and (table["seconds_per_image"] > 0).all()
    rows = strategy_table(results).set_index("name")
    assert (rows["cache"] == "fora:2").all()
    # Half of the block calls reused: a little over half of the static cost (the rest runs every step).
    assert 0.5 < rows.loc[names[0], "flops_fraction"] < 0.6 and rows.loc[names[0], "blocks_computed"] == 0.5


def test_a_cache_does_not_combine_with_other_wrappers(strategy_checkpoints):
    with pytest.raises(ValueError, match="--cache cannot be combined"):
        sampling_model(strategy_checkpoints / "FlexiDiT-lab-L-adapters.pt", coarse_steps=10, cache="fora:2")

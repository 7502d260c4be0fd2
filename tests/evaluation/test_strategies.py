"""Compute-vs-quality comparison of sampling strategies (notebook 05)."""

import pytest

from dydit_lab.evaluation.strategies import (RESULTS, STRATEGIES, compare_strategies, pareto_front, select,
                                             series_name, strategy_table)
from dydit_lab.paths import CHECKPOINT_DIR, RESULTS_CSV
from dydit_lab.viz.figures import dynamic_strategies_figure


def test_select_by_name_or_family():
    assert len(select()) == len(STRATEGIES)
    assert {s.family for s in select(["DyDiT"])} == {"DyDiT"}
    assert [s.name for s in select(["static: 20 steps"])] == ["static: 20 steps"]
    with pytest.raises(ValueError, match="choose from"):
        select(["bogus"])


def test_compare_writes_rows_and_the_figure_reads_them(strategy_checkpoints, tmp_path):
    results = tmp_path / "results.csv"
    names = ["static: 10 steps", "static: 20 steps", "DyDiT: lambda = 0.5", "FlexiDiT: k = 24 of 50 coarse"]
    table = compare_strategies(names, num_samples=10, checkpoint_dir=strategy_checkpoints, results=results,
                               timing_rounds=2, timing_samples=4, progress=False)
    assert list(table["name"]) == names and (table["seconds_per_image"] > 0).all()
    rows = strategy_table(results)
    assert set(rows["strategy"]) == {"static", "DyDiT", "FlexiDiT"}
    # 95 % intervals by default, around the point estimate.
    assert (rows["fd_lenet_lo"] <= rows["fd_lenet"]).all() and (rows["fd_lenet"] <= rows["fd_lenet_hi"]).all()
    assert (rows["bootstrap"] == 500).all()
    static = rows[rows["strategy"] == "static"].set_index("setting")
    # Same model, twice the steps: exactly twice the compute per image.
    assert static.loc["20 steps", "gflops_per_image"] == pytest.approx(2 * static.loc["10 steps", "gflops_per_image"])
    dydit = rows[rows["strategy"] == "DyDiT"].iloc[0]
    # All routers on: every block runs in full, and the whole model pays the routers on top.
    assert dydit["block_flops_fraction"] == 1 and 1 < dydit["flops_fraction"] < 1.01
    fig, shown = dynamic_strategies_figure(results)
    assert len(fig.axes) == 4 and len(shown) == 4
    assert fig.axes[0].get_xlabel().startswith("GFLOPs per image")
    # Re-timing keeps the quality columns and replaces only the timing.
    before = strategy_table(results).set_index("name")
    compare_strategies(names[:2], checkpoint_dir=strategy_checkpoints, results=results, timing_rounds=1,
                       timing_samples=4, quality=False, progress=False)
    after = strategy_table(results).set_index("name")
    assert (after["fd_lenet"] == before["fd_lenet"]).all() and (after.loc[names[:2], "timing_rounds"] == 1).all()
    with pytest.raises(ValueError, match="run with quality first"):
        compare_strategies(["static: 30 steps"], checkpoint_dir=strategy_checkpoints, results=results,
                           quality=False, progress=False)


def test_compare_names_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="DyDiT-lab-L-0.5.pt"):
        compare_strategies(["DyDiT"], checkpoint_dir=tmp_path, results=None, progress=False)


def test_strategies_name_committed_checkpoints_and_default_results():
    assert RESULTS == RESULTS_CSV
    for strategy in STRATEGIES:
        assert strategy.family in ("static", "static DiT-lab-S", "DyDiT", "DyDiT + fewer steps", "FlexiDiT",
                                   "caching", "DyDiT + caching")
        assert strategy.name.startswith(strategy.family)
        assert (CHECKPOINT_DIR / strategy.checkpoint).suffix == ".pt"
    assert len({s.name for s in STRATEGIES}) == len(STRATEGIES)


def test_series_split_caching_rows_by_policy():
    assert series_name("static", None) == "static" and series_name("DyDiT", float("nan")) == "DyDiT"
    assert series_name("caching", "fora:2") == "caching: FORA"
    assert series_name("caching", "dbcache:0.1,first=1,last=1") == "caching: DBCache"
    assert series_name("DyDiT + caching", "toca:0.3,interval=3") == "DyDiT + caching: ToCa"
    assert {series_name(s.family, s.cache) for s in STRATEGIES if s.family == "caching"} == {
        f"caching: {p}" for p in ("FORA", "FBCache", "DBCache", "TeaCache", "ToCa", "L2C")}


@pytest.mark.parametrize("higher", [False, True])
def test_pareto_front_keeps_only_unbeaten_points(higher):
    cost = [1.0, 2.0, 2.0, 3.0, 4.0]
    quality = [10.0, 8.0, 12.0, 9.0, 5.0]  # lower is better unless ``higher``
    signed = [-q for q in quality] if higher else quality
    front = pareto_front(cost, signed, higher_is_better=higher)
    assert front == [0, 1, 4]
    assert pareto_front([], []) == []

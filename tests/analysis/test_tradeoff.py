"""The λ trade-off over training seeds: sweep rows, per-λ medians and ranges, recipe targets."""

import pandas as pd
import pytest

from dydit_lab.analysis.tradeoff import (control_summaries, recipe_curves, recipe_targets, seed_summary,
                                        sweep_rows)


def sweep_table():
    rows = []
    for lam, fds in ((0.5, [21.0, 22.0, 30.0]), (0.7, [19.0, 20.0, 20.5])):
        for seed, fd in enumerate(fds):
            rows.append({"name": f"s: target_ratio={lam}, seed={seed}", "sweep": "s", "target_ratio": str(lam),
                         "fd_lenet": str(fd), "accuracy": str(1 - fd / 100), "gflops_per_image": str(10 * lam),
                         "block_flops_fraction": str(lam + 0.01 * seed)})
    rows.append({"name": "other", "sweep": "another", "fd_lenet": "5"})
    return rows


def test_sweep_rows_keep_one_sweep_as_numbers_and_name_the_known_ones():
    rows = sweep_rows(sweep_table(), "s")
    assert len(rows) == 6 and rows["fd_lenet"].dtype == float and rows["target_ratio"].dtype == float
    with pytest.raises(ValueError, match=r"sweeps present: \['another', 's'\]"):
        sweep_rows(sweep_table(), "missing")


def test_sweep_rows_select_a_grid_value_as_written_in_the_csv():
    table = sweep_table()
    for row in table:
        row["lr"] = "3e-05" if row["name"].endswith("seed=0") else "1e-05"
    picked = sweep_rows(table, "s", where={"lr": 3e-05})
    assert len(picked) == 2 and set(picked["lr"]) == {"3e-05"}
    assert len(sweep_rows(table, "s", where={"lr": "1e-05"})) == 4
    assert sweep_rows(table, "s", where={"lr": 5e-05}).empty
    with pytest.raises(ValueError, match="no column 'routers'"):
        sweep_rows(table, "s", where={"routers": "tdw"})


def test_seed_summary_gives_median_and_range_per_lambda():
    summary = seed_summary(sweep_rows(sweep_table(), "s")).set_index("target_ratio")
    assert list(summary["runs"]) == [3, 3]
    assert summary.loc[0.5, "fd_lenet_median"] == 22.0
    assert (summary.loc[0.5, "fd_lenet_min"], summary.loc[0.5, "fd_lenet_max"]) == (21.0, 30.0)
    assert summary.loc[0.7, "gflops_per_image_median"] == pytest.approx(7.0)
    with pytest.raises(ValueError, match="routers"):
        seed_summary(sweep_rows(sweep_table(), "s"), by="routers")


def test_seed_summary_counts_the_devices_runs_trained_on():
    table = [{**row, "device": "cuda" if row["name"].endswith("seed=2") else "cpu"} for row in sweep_table()]
    summary = seed_summary(sweep_rows(table, "s")).set_index("target_ratio")
    assert summary.loc[0.5, "devices"] == "cpu 2, cuda 1"
    assert "devices" not in seed_summary(sweep_rows(sweep_table(), "s")).columns


def test_recipe_targets_judge_median_worst_and_fractions():
    rows = sweep_rows(sweep_table(), "s")
    half = rows[rows["target_ratio"] == 0.5]
    verdict = recipe_targets(half, parent_fd=21.0)
    assert verdict["runs"] == 3 and verdict["median_fd"] == 22.0
    assert verdict["median_fd_ok"] and not verdict["worst_fd_ok"]  # 22 <= 22.05; 30 > 24.15
    assert verdict["worst_fraction_gap"] == pytest.approx(0.02) and verdict["fractions_ok"]
    assert verdict["median_run"] == "s: target_ratio=0.5, seed=1"  # the run to commit, not the best
    assert not recipe_targets(half, parent_fd=20.0)["median_fd_ok"]
    with pytest.raises(ValueError, match="no runs"):
        recipe_targets(pd.DataFrame(columns=half.columns), parent_fd=21.0)


def test_control_summaries_give_one_point_per_grid_value_and_ignore_empty_columns():
    def row(sweep, seed, fd, **grid):
        return {"name": f"{sweep}: {grid} seed={seed}", "sweep": sweep, "fd_lenet": str(fd), "accuracy": "0.9",
                "gflops_per_image": "5.5", "routers": "", "lr": "", **grid}
    table = [row("plain", 0, 10.0), row("plain", 1, 12.0, lr="3e-4"),
             row("abl", 0, 30.0, routers="tdw"), row("abl", 0, 40.0, routers="sdt"),
             row("ctl 1,200 steps, lr sweep", 0, 7.0, lr="1e-05"), row("ctl 1,200 steps, lr sweep", 0, 8.0, lr="3e-05")]
    controls = {name: sweep_rows(table, name) for name in ("plain", "abl", "ctl 1,200 steps, lr sweep")}
    summaries = control_summaries(controls)
    assert sorted(summaries) == ["SDT only", "TDW only", "ctl 1,200 steps, lr 1e-05", "ctl 1,200 steps, lr 3e-05", "plain"]
    assert summaries["plain"].runs.iloc[0] == 2 and summaries["plain"].fd_lenet_median.iloc[0] == 11.0
    only_tdw = control_summaries({"abl": sweep_rows(table[2:3], "abl")})
    assert list(only_tdw) == ["TDW only"]  # one router kind present is still that kind's point
    assert summaries["ctl 1,200 steps, lr 3e-05"].fd_lenet_median.iloc[0] == 8.0


def flexi_rows():
    """Two recipes' rows, as FlexiDiT sweeps write them: one per training seed and k coarse."""
    rows = []
    for sweep, rank, fds in (("adapters", "8", {0: [6.0], 24: [20.0]}), ("adapters", "32", {0: [6.0, 6.0], 24: [15.0, 17.0]}),
                             ("every", "", {0: [14.0, 20.0, 16.0], 24: [19.0, 24.0, 21.0]})):
        for k, values in fds.items():
            for seed, fd in enumerate(values):
                rows.append({"name": f"{sweep}: lora_rank={rank}, seed={seed}, k = {k} coarse", "sweep": sweep,
                             "lora_rank": rank, "coarse_steps": str(k), "fd_lenet": str(fd), "accuracy": "0.9",
                             "gflops_per_image": str(5.5 - k / 12)})
    return rows


def test_recipe_curves_summarise_each_recipe_over_seeds_per_k():
    recipes = {"every weight": ("every", None), "rank 32": ("adapters", {"lora_rank": 32}),
               "rank 8": ("adapters", {"lora_rank": 8}), "not run yet": ("missing sweep", None)}
    curves = recipe_curves(flexi_rows(), recipes)
    assert list(curves) == ["every weight", "rank 32", "rank 8"]  # a recipe without rows is left out
    every = curves["every weight"].set_index("coarse_steps")
    assert every.loc[0, "runs"] == 3 and every.loc[0, "fd_lenet_median"] == 16.0
    assert (every.loc[24, "fd_lenet_min"], every.loc[24, "fd_lenet_max"]) == (19.0, 24.0)
    assert curves["rank 32"].set_index("coarse_steps").loc[24, "fd_lenet_median"] == 16.0
    assert curves["rank 8"]["runs"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="none of the recipes"):
        recipe_curves(flexi_rows(), {"x": ("missing sweep", None)})


def test_seed_summary_carries_the_median_runs_interval():
    table = sweep_table()
    for row in table[:6]:
        fd = float(row["fd_lenet"])
        row.update(fd_lenet_lo=str(fd - 1), fd_lenet_hi=str(fd + 2), accuracy_lo="0.7", accuracy_hi="")
    rows = sweep_rows(table, "s")
    summary = seed_summary(rows).set_index("target_ratio")
    assert (summary.loc[0.5, "fd_lenet_lo"], summary.loc[0.5, "fd_lenet_hi"]) == (21.0, 24.0)  # the run at 22
    assert summary.loc[0.7, "accuracy_lo"] == 0.7 and pd.isna(summary.loc[0.7, "accuracy_hi"])  # a missing bound
    even = seed_summary(rows[rows["name"] != "s: target_ratio=0.5, seed=2"]).set_index("target_ratio")
    assert pd.isna(even.loc[0.5, "fd_lenet_lo"]) and even.loc[0.7, "fd_lenet_lo"] == 19.0  # 2 runs: no median run
    assert "fd_lenet_lo" not in seed_summary(sweep_rows(sweep_table(), "s")).columns

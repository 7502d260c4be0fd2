"""Compute-vs-quality comparison of sampling strategies (notebook 05)."""

import pytest
import torch

import dydit_lab
from dydit_lab.dydit import DyDiT
from dydit_lab.evaluation import SampleEvaluator, evaluate_checkpoint
from dydit_lab import figures
from dydit_lab.figures import dynamic_strategies_figure
from dydit_lab.flexidit import FlexiDiT, schedule_flops
from dydit_lab.flops import analytic_flops
from dydit_lab.strategies import STRATEGIES, compare_strategies, select, strategy_table


@pytest.fixture(scope="module")
def evaluator():
    return SampleEvaluator.from_default()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny stand-ins for every checkpoint the strategies name, in our export layout."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    dit = dydit_lab.create_model("DiT-lab-T")
    models = {"DiT-lab-L.pt": dit, "FlexiDiT-lab-L.pt": FlexiDiT.from_dit(dit)}
    for lam in ("0.7", "0.5"):
        models[f"DyDiT-lab-L-{lam}.pt"] = DyDiT.from_dit(dit)
    for name, model in models.items():
        torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}, "step": 7}, folder / name)
    return folder


def test_flexidit_schedule_costs_and_times(checkpoints, evaluator):
    path = checkpoints / "FlexiDiT-lab-L.pt"
    native = evaluate_checkpoint(path, num_samples=10, steps=4, evaluator=evaluator, progress=False)
    coarse = evaluate_checkpoint(path, num_samples=10, steps=4, coarse_steps=2, evaluator=evaluator,
                                 progress=False)
    config = dydit_lab.create_model("DiT-lab-T").config
    assert native["gflops_per_step"] == pytest.approx(analytic_flops(config)["total"] / 1e9)
    assert coarse["gflops_per_image"] == pytest.approx(schedule_flops(config, None, 2, 4)["total_gflops"])
    assert coarse["gflops_per_image"] < native["gflops_per_image"]
    for metrics in (native, coarse):
        assert metrics["seconds_per_image"] > 0 and metrics["train_steps"] == 7
        assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_lenet"] > 0


def test_coarse_steps_need_a_flexidit(checkpoints, evaluator):
    with pytest.raises(ValueError, match="FlexiDiT"):
        evaluate_checkpoint(checkpoints / "DiT-lab-L.pt", num_samples=4, steps=2, coarse_steps=1,
                            evaluator=evaluator, progress=False)


def test_select_by_name_or_family():
    assert len(select()) == len(STRATEGIES)
    assert {s.family for s in select(["DyDiT"])} == {"DyDiT"}
    assert [s.name for s in select(["static: 20 steps"])] == ["static: 20 steps"]
    with pytest.raises(ValueError, match="choose from"):
        select(["bogus"])


def test_compare_writes_rows_and_the_figure_reads_them(checkpoints, tmp_path):
    results = tmp_path / "results.csv"
    names = ["static: 10 steps", "static: 20 steps", "DyDiT: lambda = 0.5", "FlexiDiT: k = 24 of 50 coarse"]
    table = compare_strategies(names, num_samples=10, checkpoint_dir=checkpoints, results=results,
                               timing_rounds=2, timing_samples=4, progress=False)
    assert list(table["name"]) == names and (table["seconds_per_image"] > 0).all()
    rows = strategy_table(results)
    assert set(rows["strategy"]) == {"static", "DyDiT", "FlexiDiT"}
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
    compare_strategies(names[:2], checkpoint_dir=checkpoints, results=results, timing_rounds=1,
                       timing_samples=4, quality=False, progress=False)
    after = strategy_table(results).set_index("name")
    assert (after["fd_lenet"] == before["fd_lenet"]).all() and (after.loc[names[:2], "timing_rounds"] == 1).all()
    with pytest.raises(ValueError, match="run with quality first"):
        compare_strategies(["static: 30 steps"], checkpoint_dir=checkpoints, results=results, quality=False,
                           progress=False)


def test_compare_cli(checkpoints, tmp_path, capsys):
    from dydit_lab.cli import main

    main(["compare", "--only", "static: 10 steps", "--num-samples", "10", "--checkpoint-dir", str(checkpoints),
          "--results", str(tmp_path / "r.csv"), "--device", "cpu", "--timing-rounds", "1",
          "--timing-samples", "4"])
    assert "static: 10 steps" in capsys.readouterr().out
    assert list(strategy_table(tmp_path / "r.csv")["name"]) == ["static: 10 steps"]


def test_compare_names_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="DyDiT-lab-L-0.5.pt"):
        compare_strategies(["DyDiT"], checkpoint_dir=tmp_path, results=None, progress=False)


def test_strategy_samples_figure(checkpoints, monkeypatch):
    monkeypatch.setattr(figures, "CHECKPOINT_DIR", checkpoints)
    fig = figures.strategy_samples_figure(["static: 10 steps", "FlexiDiT: k = 24 of 50 coarse"], num=10)
    assert [ax.get_title() for ax in fig.axes] == ["static: 10 steps", "FlexiDiT: k = 24 of 50 coarse"]


def test_flops_tables():
    table = figures.flops_table().set_index("arch")
    assert table.loc["DiT-XL/2", "gflops"] == 118.6887  # the DiT paper's 118.6 GFLOPs
    assert table.loc["DiT-lab-L", "gflops"] / table.loc["DiT-lab-S", "gflops"] > 5
    flexi = figures.flexidit_schedule_table()
    assert flexi["flops_fraction"].iloc[0] == 1 and flexi["flops_fraction"].is_monotonic_decreasing


def test_complete_model_evaluation_of_a_dydit(checkpoints, evaluator):
    full = evaluate_checkpoint(checkpoints / "DyDiT-lab-L-0.5.pt", num_samples=10, steps=2, complete_model=True,
                               evaluator=evaluator, progress=False)
    static = analytic_flops(dydit_lab.create_model("DiT-lab-T").config)["total"] / 1e9
    assert full["gflops_per_step"] == pytest.approx(static) and full["flops_fraction"] == 1.0
    # Routers start all-on, so the converted model and its complete model sample the same digits.
    routed = evaluate_checkpoint(checkpoints / "DyDiT-lab-L-0.5.pt", num_samples=10, steps=2,
                                 evaluator=evaluator, progress=False)
    assert routed["fd_lenet"] == pytest.approx(full["fd_lenet"], rel=1e-4)
    with pytest.raises(ValueError, match="DyDiT"):
        evaluate_checkpoint(checkpoints / "DiT-lab-L.pt", num_samples=4, steps=2, complete_model=True,
                            evaluator=evaluator, progress=False)


def test_complete_model_from_t_routes_only_below_it():
    from dydit_lab.evaluation import CompleteModel, sampling_cost

    torch.manual_seed(0)
    dit = dydit_lab.create_model("DiT-lab-T")
    for p in dit.parameters():  # past adaLN-Zero's zero output
        p.data.normal_(0, 0.05)
    dydit = DyDiT.from_dit(dit).eval()
    for block in dydit.blocks:  # the routers close heads 2-3 at every t
        block.attn_rate.router.bias.data = torch.tensor([15.0, -15.0, -15.0])
    x, y = torch.randn(4, 1, 32, 32), torch.arange(4)
    t = torch.tensor([100, 900, 100, 900])
    hybrid = CompleteModel(dydit, from_t=500)(x, t, y)
    high, low = t >= 500, t < 500
    assert torch.allclose(hybrid[high], dydit(x[high], t[high], y[high], complete_model=True), atol=1e-6)
    assert torch.allclose(hybrid[low], dydit(x[low], t[low], y[low]), atol=1e-6)
    assert not torch.allclose(hybrid[low], dydit(x[low], t[low], y[low], complete_model=True), atol=1e-4)
    routed = sampling_cost(dydit, steps=4)["flops_fraction"]
    partial = sampling_cost(CompleteModel(dydit, from_t=500), steps=4)["flops_fraction"]
    # DDIM-4 visits t = 999, 749 (complete) and 500, 250 ... the two routed steps keep their cost.
    assert routed < partial < 1.0
    with pytest.raises(ValueError, match="from_t"):
        CompleteModel(dydit, from_t=1000)

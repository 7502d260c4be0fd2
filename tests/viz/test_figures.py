"""The figure builders behind the notebooks and `make figures`."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

import dydit_lab
from dydit_lab.analysis.routing import trace_sampling
from dydit_lab.checkpoints import save_training_checkpoint
from dydit_lab.models.configs import get_config
from dydit_lab.models.dydit import DyDiT
from dydit_lab.training.pretrain import TrainConfig
from dydit_lab.viz import figures


def _bench_row(ratio, speedup, batch=2, device="cpu"):
    return {"arch": "DiT-XL/2", "device": device, "batch_size": batch, "target_ratio": ratio,
            "flops_ratio": ratio + 0.004, "static_seconds": 1.0, "dynamic_seconds": 1 / speedup,
            "masked_seconds": 1.1, "speedup": speedup, "masked_speedup": 0.9}


def test_speedup_figure_reads_json_and_csv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_bench_row(0.5, 1.9)))
    import pandas as pd
    pd.DataFrame([_bench_row(0.7, 1.3, b) for b in (1, 2, 4)]).to_csv(tmp_path / "sweep.csv", index=False)
    fig, table = figures.speedup_figure(figures.load_bench(tmp_path))
    assert len(table) == 4 and len(fig.axes) == 2
    assert "efficiency" not in table.columns  # only the columns the runs have
    (tmp_path / "b.json").write_text(json.dumps({**_bench_row(0.5, 1.8), "efficiency": 0.9,
                                                 "efficiency_runs": "[0.9, 0.88, 0.93]", "runs": 3}))
    table = figures.load_bench(tmp_path)
    assert {"efficiency", "efficiency_runs", "runs"} <= set(table.columns)
    assert table["efficiency_runs"].dropna().tolist() == [(0.9, 0.88, 0.93)]
    # a row without a recorded spread gets it from its static passes; a recorded one is kept
    (tmp_path / "c.json").write_text(json.dumps({**_bench_row(0.5, 1.7, 8), "speedup_runs": [1.7, 1.6, 1.8],
                                                 "static_pass_seconds": [2.0, 2.5, 2.2]}))
    (tmp_path / "d.json").write_text(json.dumps({**_bench_row(0.5, 1.7, 16), "static_pass_spread": 0.04,
                                                 "static_pass_seconds": [2.0, 2.5, 2.2]}))
    table = figures.load_bench(tmp_path).set_index("batch_size")
    assert table.loc[8, "static_pass_spread"] == pytest.approx(0.5 / 2.2)
    assert table.loc[16, "static_pass_spread"] == 0.04
    assert table.loc[8, "speedup_runs"] == (1.7, 1.6, 1.8)
    # the best-pass reading (session 24 on) comes along where a row has it
    (tmp_path / "e.json").write_text(json.dumps({**_bench_row(0.5, 1.9, 32), "best_pass_efficiency_median": 0.96,
                                                 "best_pass_efficiency_runs": "[0.95, 0.96, 0.97]"}))
    table = figures.load_bench(tmp_path).set_index("batch_size")
    assert table.loc[32, "best_pass_efficiency_median"] == 0.96
    assert table.loc[32, "best_pass_efficiency_runs"] == (0.95, 0.96, 0.97)
    assert pd.isna(table.loc[16, "best_pass_efficiency_median"])
    assert fig.axes[0].get_xlabel().startswith("FLOPs fraction")
    with pytest.raises(FileNotFoundError, match="bench"):
        figures.load_bench(tmp_path / "empty")


def test_lab_bench_reads_bench_sweeps_and_compare_retimings(tmp_path):
    import pandas as pd
    (tmp_path / "lab").mkdir()
    pd.DataFrame([{"name": "DyDiT-lab-L-0.5", "device": "cpu", "num_threads": 2, "batch_size": 100, "steps": 50,
                   "flops_ratio": 0.52, "speedup": 1.9, "ideal_speedup": 1 / 0.52, "efficiency": 1.9 * 0.52,
                   "masked_speedup": 0.97, "static_pass_spread": 0.03}]).to_csv(tmp_path / "lab" / "cpu.csv",
                                                                                  index=False)
    pd.DataFrame([{"name": "static: 50 steps", "flops_fraction": 1.0, "speedup": 1.0, "ideal_speedup": 1.0,
                   "device": "cuda", "timing_samples": 100, "steps": 50},
                  {"name": "DyDiT: lambda = 0.5", "flops_fraction": 0.5, "speedup": 0.6, "ideal_speedup": 2.0,
                   "device": "cuda", "timing_samples": 100, "steps": 50}]).to_csv(tmp_path / "lab" / "gpu.csv",
                                                                                   index=False)
    lab = figures.load_lab_bench(tmp_path)
    assert list(lab.columns) == figures.LAB_BENCH_COLUMNS and len(lab) == 2  # the compare run's static row dropped
    gpu = lab[lab["device"] == "cuda"].iloc[0]
    assert lab[lab["device"] == "cpu"]["static_pass_spread"].tolist() == [0.03]  # a compare re-timing has none
    assert pd.isna(gpu["static_pass_spread"])
    assert gpu["efficiency"] == pytest.approx(0.3) and gpu["batch_size"] == 100 and gpu["flops_ratio"] == 0.5
    (tmp_path / "sweep.csv").write_text(pd.DataFrame([_bench_row(0.5, 1.9)]).to_csv(index=False))
    fig, _ = figures.speedup_figure(figures.load_bench(tmp_path), lab=lab)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "trained lab DyDiT (cpu, 2 threads)" in labels and "trained lab DyDiT (cuda)" in labels
    with pytest.raises(FileNotFoundError, match="bench --checkpoint"):
        figures.load_lab_bench(tmp_path / "none")


def test_quality_vs_flops_figure(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("name,accuracy,fd_lenet,gflops_per_step,gflops_per_image,strategy,steps,coarse_steps,checkpoint\n"
                    "real-val,0.98,4.1,,,,,,\n"
                    "static: 50 steps,0.9,6,0.11,5.5,static,50,,data/checkpoints/DiT-lab-L.pt\n"
                    "static: 20 steps,0.9,8,0.11,2.2,static,20,,data/checkpoints/DiT-lab-L.pt\n"
                    "DyDiT: lambda = 0.5,0.9,14,0.057,2.85,DyDiT,50,,data/checkpoints/DyDiT-lab-L-0.5.pt\n"
                    "FlexiDiT: k = 12 of 50 coarse,0.9,10,0.09,4.5,FlexiDiT,50,12,data/checkpoints/FlexiDiT-lab-L-adapters.pt\n"
                    "caching: FORA N = 2,0.8,30,0.05,2.5,caching,50,,data/checkpoints/DiT-lab-L.pt\n")
    fig, table = figures.quality_vs_flops_figure(path)  # each checkpoint once, at its own 50-step path
    assert list(table["name"]) == ["DyDiT-lab-L-0.5", "DiT-lab-L"] and len(fig.axes) == 2
    path.write_text("name,accuracy,fd_lenet,gflops_per_step\nDiT-lab-L,0.9,6,0.11\n")
    with pytest.raises(FileNotFoundError, match="compare"):
        figures.quality_table(path)


def test_flexidit_recipes_figure_reads_the_sweeps_and_the_static_rows(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("name,sweep,lr,lora_rank,coarse_steps,fd_lenet,accuracy,gflops_per_image,strategy,steps\n"
                    "static: 50 steps,,,,,6.2,0.94,5.54,static,50\n"
                    "static: 20 steps,,,,,8.2,0.95,2.21,static,20\n"
                    "a: seed=0 k = 0,FlexiDiT-lab-L,,,0,13.9,0.9,5.54,,\n"
                    "a: seed=1 k = 0,FlexiDiT-lab-L,,,0,20.5,0.9,5.54,,\n"
                    "a: seed=0 k = 24,FlexiDiT-lab-L,,,24,19.8,0.85,3.53,,\n"
                    "b: k = 24,\"FlexiDiT-lab-L, coarse-only adapters\",1e-4,32,24,15.0,0.9,3.53,,\n")
    fig, table = figures.flexidit_recipes_figure(path)
    assert table["recipe"].tolist() == ["every weight (lr 1e-4)", "every weight (lr 1e-4)", "frozen + adapters, rank 32"]
    assert table["fd_lenet_median"].tolist() == [17.2, 19.8, 15.0] and table["runs"].tolist() == [2, 1, 1]
    reference = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("parent")][0]
    assert list(reference.get_xdata()) == [2.21, 5.54]
    assert "flexidit_recipes" in figures.BUILDERS


def test_router_schedules_figure_from_traces():
    torch.manual_seed(0)
    model = DyDiT(get_config("DiT-lab-T"))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    traces = {"a": trace_sampling(model.eval(), [1, 2], steps=4, progress=False, name="a")}
    fig, table = figures.router_schedules_figure(traces)
    assert len(fig.axes) >= 6 and list(table["model"]) == ["a"]
    assert 0 < table["flops_fraction"].iloc[0] <= 1.0001


def test_build_figures_skips_missing_checkpoints_and_writes_the_rest(tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpts"
    model = dydit_lab.create_model("DiT-lab-T")
    save_training_checkpoint(ckpts / "DiT-lab-S.pt", model, model,
                             torch.optim.AdamW(model.parameters()), TrainConfig(arch="DiT-lab-T"), 1)
    monkeypatch.setattr(figures, "CHECKPOINT_DIR", ckpts)
    done = figures.build_figures(tmp_path / "out", only=["samples_DiT-lab-S", "samples_DiT-lab-L"])
    assert (tmp_path / "out" / "samples_DiT-lab-S.png").stat().st_size > 1000
    assert done["samples_DiT-lab-L"].startswith("skipped: missing") and "train" in done["samples_DiT-lab-L"]
    with pytest.raises(ValueError, match="unknown figure"):
        figures.build_figures(tmp_path / "out", only=["nope"])


def test_strategy_samples_figure(strategy_checkpoints, monkeypatch):
    monkeypatch.setattr(figures, "CHECKPOINT_DIR", strategy_checkpoints)
    fig = figures.strategy_samples_figure(["static: 10 steps", "FlexiDiT: k = 24 of 50 coarse"], num=10)
    assert [ax.get_title() for ax in fig.axes] == ["static: 10 steps", "FlexiDiT: k = 24 of 50 coarse"]


def test_flops_tables():
    table = figures.flops_table().set_index("arch")
    assert table.loc["DiT-XL/2", "gflops"] == 118.6887  # the DiT paper's 118.6 GFLOPs
    assert table.loc["DiT-lab-L", "gflops"] / table.loc["DiT-lab-S", "gflops"] > 5
    flexi = figures.flexidit_schedule_table()
    assert flexi["flops_fraction"].iloc[0] == 1 and flexi["flops_fraction"].is_monotonic_decreasing


def test_loss_gap_figure_with_two_runs_per_size(tmp_path, monkeypatch):
    digits = torch.rand(4, 1, 32, 32) * 2 - 1, torch.arange(4)
    monkeypatch.setattr(figures, "mnist_split", lambda split: TensorDataset(*digits))  # not the 5,000
    paths = {}
    for size, seeds in (("S", (0, 1)), ("L", (2, 3))):
        for seed in seeds:
            torch.manual_seed(seed)
            model = dydit_lab.create_model("DiT-lab-T")
            for p in model.parameters():
                p.data.normal_(0, 0.02)
            paths.setdefault(size, []).append(tmp_path / f"{size}-seed{seed}.pt")
            torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}}, paths[size][-1])
    fig, table = figures.loss_gap_figure(paths, timesteps=[0, 500], samples_per_t=2, smooth=1,
                                         progress=False)
    assert len(fig.axes) == 3 and "relative" in fig.axes[2].get_ylabel()
    assert list(table["pairs"]) == [4] * 4 and table["seed_lo"].notna().any()
    one, table = figures.loss_gap_figure({s: p[:1] for s, p in paths.items()}, timesteps=[0, 999],
                                         samples_per_t=2, progress=False)
    assert len(one.axes) == 3 and table["seed_lo"].isna().all()


def test_caching_drift_figure(strategy_checkpoints, monkeypatch):
    monkeypatch.setattr(figures, "CHECKPOINT_DIR", strategy_checkpoints)
    fig, summary = figures.caching_drift_figure({"FORA N = 2": "fora:2", "ToCa 30% every 3": "toca:0.3,interval=3"},
                                                num_samples=2)
    assert list(summary.setting) == ["FORA N = 2", "ToCa 30% every 3"]
    assert (summary.flops_fraction < 1).all()  # (its adaLN-zero blocks are identities: no drift to see)
    assert fig.axes[0].images[0].get_array().shape == (2, 50)  # settings x sampling steps
    monkeypatch.setattr(figures, "CHECKPOINT_DIR", strategy_checkpoints / "missing")
    with pytest.raises(FileNotFoundError, match="DiT-lab-L"):
        figures.caching_drift_figure({"FORA N = 2": "fora:2"})

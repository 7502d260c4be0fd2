"""Every test that runs the command line (``dydit_lab.cli.main``, in process or as
``python -m dydit_lab`` / ``torchrun -m dydit_lab``), by command."""

import copy
import csv
import dataclasses
import json
import shutil

import pytest
import torch

import dydit_lab
from dydit_lab.checkpoints import load_flexidit, read_checkpoint
from dydit_lab import cli
from dydit_lab.cli import main
from dydit_lab.evaluation.results import read_results, record_result
from dydit_lab.evaluation.strategies import strategy_table
from dydit_lab.models.flops import analytic_flops, dynamic_block_flops
from dydit_lab.models.dydit import DyDiT
from dydit_lab.models.flexidit import FlexiDiT
from dydit_lab.paths import DATA_DIR
from tests.helpers import BENCH_ARCH, BENCH_RESULT_KEYS, lab_t_macs, run_module, write_image_folder
from tests.helpers import cli_error, random_dydit

COMMITTED_RESUME = DATA_DIR / "resume" / "lab-L" / "checkpoint.pt"  # a real pre-refactor run at step 12000




def _steps_of(log):
    return [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def test_cli_train_and_missing_resume(tmp_path, capsys):
    main(["train", "--arch", "DiT-lab-T", "--out", str(tmp_path / "a"), "--steps", "2",
          "--batch-size", "4"])
    assert "checkpoint:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["train", "--arch", "DiT-lab-T", "--out", str(tmp_path / "b"), "--steps", "2", "--resume"])
    assert err.value.code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_config_comments_are_the_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 disables the min-SNR weighting (default: 5.0)" in text
    assert "--resume go on from OUT/checkpoint.pt" in text


def test_train_cli_on_an_image_folder(tmp_path, capsys):
    data = write_image_folder(tmp_path / "digits")
    main(["train", "--arch", "DiT-lab-T", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
          "--batch-size", "4", "--device", "cpu"])
    assert "checkpoint:" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["data"] == str(data)
    assert type(dydit_lab.load_model(tmp_path / "run" / "checkpoint.pt")) is dydit_lab.DiT
    err = cli_error(capsys, ["train", "--arch", "DiT-lab-T", "--data", str(tmp_path / "none"),
                          "--out", str(tmp_path / "x"), "--steps", "1"])
    assert "does not exist" in err


# Fields of TrainConfig before the refactor (e3a5b16): a checkpoint of that time records them.
OLD_TRAIN_ARGS = dict(arch="DiT-lab-T", data="mnist", out="runs/old", steps=5, batch_size=4, lr=1e-3,
                      warmup_steps=200, decay_steps=0, weight_decay=0.0, ema_decay=0.9995, min_snr_gamma=5.0,
                      grad_clip=1.0, seed=0, ckpt_every=500, ckpt_minutes=5.0, eval_every=0, eval_samples=500,
                      device="auto", precision="fp32", compile=False, resume=False)
# ... and of FinetuneConfig.
OLD_FINETUNE_ARGS = dict(parent="data/checkpoints/DiT-lab-L.pt", out="runs/dydit-old", target_ratio=0.5,
                         steps=5, hold_steps=1, anneal_steps=3, batch_size=4, lr=1e-4, router_lr=3e-3,
                         tdw_init_bias=15.0, sdt_init_bias=5.0, flops_weight=2.0, complete_model_steps=0,
                         noise_off_step=6, router_objective="relative", distill=0.0, min_snr_gamma=5.0,
                         ema_decay=0.995, grad_clip=1.0, seed=0, ckpt_minutes=4.0, device="auto", resume=False)


def _one_adamw_step(model, groups):
    """An AdamW that has taken one step (so its state has something to restore)."""
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    x = torch.randn(2, 1, 32, 32)
    model(x, torch.tensor([10, 900]), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    return opt


def _adam_steps(path):
    return {int(state["step"]) for state in read_checkpoint(path)["opt"]["state"].values()}


def test_train_resumes_a_pre_refactor_checkpoint(tmp_path, capsys):
    model = dydit_lab.create_model("DiT-lab-T")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    opt = _one_adamw_step(model, model.parameters())  # one param group, as train() made it
    assert len(opt.state_dict()["param_groups"]) == 1
    old = {"model": model.state_dict(), "ema": copy.deepcopy(model).state_dict(), "opt": opt.state_dict(),
           "args": OLD_TRAIN_ARGS | {"model_config": dataclasses.asdict(model.config)}, "step": 5}
    run = tmp_path / "old"
    run.mkdir()
    torch.save(old, run / "checkpoint.pt")
    main(["train", "--arch", "DiT-lab-T", "--out", str(run), "--steps", "7", "--batch-size", "4",
          "--device", "cpu", "--resume"])
    assert "checkpoint:" in capsys.readouterr().out
    new = read_checkpoint(run / "checkpoint.pt")
    assert new["step"] == 7 and new["args"]["kind"] == "dit"
    assert _adam_steps(run / "checkpoint.pt") == {3}  # the restored optimizer went on: 1 + 2 steps
    assert _steps_of(run / "log.csv") == [6, 7]
    moved = max((new["model"][k] - old["model"][k]).abs().max().item() for k in old["model"] if k != "pos_embed")
    assert 0 < moved < 0.05  # two small steps on from the saved weights, not from a fresh init
    assert type(dydit_lab.load_model(run / "checkpoint.pt")) is dydit_lab.DiT


def test_train_resumes_the_committed_lab_L_run(tmp_path, capsys):
    """data/resume/lab-L: a real DiT-lab-L checkpoint of the old code at step 12000 (and its log)."""
    run = tmp_path / "lab-L"
    run.mkdir()
    shutil.copy(COMMITTED_RESUME, run / "checkpoint.pt")
    shutil.copy(COMMITTED_RESUME.parent / "log.csv", run / "log.csv")
    main(["train", "--arch", "DiT-lab-L", "--out", str(run), "--steps", "12002", "--batch-size", "64",
          "--device", "cpu", "--resume"])
    assert "checkpoint:" in capsys.readouterr().out
    ckpt = read_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 12002 and ckpt["args"]["arch"] == "DiT-lab-L"
    assert _steps_of(run / "log.csv")[-3:] == [12000, 12001, 12002]
    assert (run / "log.csv").read_text().splitlines()[0] == "step,loss,lr,time,accuracy,fd_lenet"  # header kept
    model = dydit_lab.load_model(run / "checkpoint.pt")
    assert type(model) is dydit_lab.DiT and model.arch == "DiT-lab-L"


# ---------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------


def _finetune_args(parent, out, steps=2):
    return ["finetune", "--parent", str(parent), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--hold-steps", "0", "--anneal-steps", "1", "--noise-off-step", "0", "--device", "cpu"]


def test_finetune_on_an_image_folder(exported_parent, tmp_path, capsys):
    data = write_image_folder(tmp_path / "digits")
    main(_finetune_args(exported_parent, tmp_path / "ft") + ["--data", str(data)])
    assert "checkpoint:" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["data"] == str(data) and ckpt["args"]["kind"] == "dydit"
    assert isinstance(dydit_lab.load_model(tmp_path / "ft" / "checkpoint.pt"), DyDiT)


def test_finetune_names_a_parent_that_is_no_dit(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    torch.save({"weights": [1, 2, 3], "note": "not a model", "step": 4}, junk)
    err = cli_error(capsys, _finetune_args(junk, tmp_path / "ft"))
    assert str(junk) in err and "not a DiT checkpoint" in err
    err = cli_error(capsys, ["flexi-finetune", "--parent", str(junk), "--out", str(tmp_path / "flexi"),
                          "--steps", "2", "--device", "cpu"])
    assert str(junk) in err and "not a DiT checkpoint" in err
    assert not (tmp_path / "ft").exists() and not (tmp_path / "flexi").exists()


def test_finetune_resumes_a_pre_refactor_checkpoint(exported_parent, tmp_path, capsys):
    dydit = DyDiT.from_dit(dydit_lab.load_model(exported_parent), sdt_bias=5.0)
    routers = dydit.router_parameters()
    ids = set(map(id, routers))
    groups = [{"params": [p for p in dydit.parameters() if p.requires_grad and id(p) not in ids], "lr": 1e-4},
              {"params": routers, "lr": 3e-3}]  # [non-router, router], as finetune() made them
    opt = _one_adamw_step(dydit, groups)
    old_args = OLD_FINETUNE_ARGS | {"parent": str(exported_parent), "arch": "DiT-lab-T",
                                    "model_config": dataclasses.asdict(dydit.config), "kind": "dydit"}
    run = tmp_path / "old-ft"
    run.mkdir()
    torch.save({"model": dydit.state_dict(), "ema": copy.deepcopy(dydit).state_dict(), "opt": opt.state_dict(),
                "args": old_args, "step": 5}, run / "checkpoint.pt")
    main(["finetune", "--parent", str(exported_parent), "--out", str(run), "--steps", "7", "--batch-size", "4",
          "--hold-steps", "1", "--anneal-steps", "3", "--noise-off-step", "6", "--device", "cpu", "--resume"])
    assert "checkpoint:" in capsys.readouterr().out
    new = read_checkpoint(run / "checkpoint.pt")
    assert new["step"] == 7 and new["args"]["kind"] == "dydit"
    assert [g["lr"] for g in new["opt"]["param_groups"]] == pytest.approx([1e-4, 3e-3])
    assert _adam_steps(run / "checkpoint.pt") == {3}
    assert _steps_of(run / "log.csv") == [6, 7]
    assert isinstance(dydit_lab.load_model(run / "checkpoint.pt"), DyDiT)


# ---------------------------------------------------------------------------
# DDP: every training command under torchrun (gloo on CPU, two processes)
# ---------------------------------------------------------------------------


def _ddp(tmp_path, *args):
    done = run_module(*args, "--out", str(tmp_path / "run"), "--device", "cpu", torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint:") <= 1  # rank 0 speaks for the run
    return tmp_path / "run" / "checkpoint.pt"


@pytest.mark.slow  # the same loop as the finetune DDP test, which runs by default
def test_ddp_gloo_two_processes(tmp_path):
    path = _ddp(tmp_path, "train", "--arch", "DiT-lab-T", "--steps", "3", "--batch-size", "8")
    ckpt = read_checkpoint(path)
    assert ckpt["step"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    assert type(dydit_lab.load_model(path)) is dydit_lab.DiT
    assert _steps_of(path.parent / "log.csv") == [1, 2, 3]  # one log, written by rank 0


def test_ddp_gloo_two_processes_finetune(exported_parent, tmp_path):
    path = _ddp(tmp_path, "finetune", "--parent", str(exported_parent), "--steps", "3", "--batch-size", "8",
                "--hold-steps", "0", "--anneal-steps", "1", "--noise-off-step", "2")
    ckpt = read_checkpoint(path)
    assert ckpt["step"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["args"]["kind"] == "dydit" and len(ckpt["opt"]["param_groups"]) == 2
    assert isinstance(dydit_lab.load_model(path), DyDiT)
    assert _steps_of(path.parent / "log.csv") == [1, 2, 3]


@pytest.mark.slow  # the same loop as the finetune DDP test, which runs by default
def test_ddp_gloo_two_processes_flexi_finetune(exported_parent, tmp_path):
    path = _ddp(tmp_path, "flexi-finetune", "--parent", str(exported_parent), "--steps", "3", "--batch-size", "8",
                "--p-coarse", "0.5")
    ckpt = read_checkpoint(path)
    assert ckpt["step"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["args"]["kind"] == "flexidit"
    model = dydit_lab.load_model(path)
    assert isinstance(model, FlexiDiT) and model.coarse_patches == (16,)
    assert _steps_of(path.parent / "log.csv") == [1, 2, 3]


# ---------------------------------------------------------------------------
# flexi-finetune, flexi-flops
# ---------------------------------------------------------------------------


def test_flexi_finetune_cli(parent, tmp_path, capsys):
    main(["flexi-finetune", "--parent", str(parent), "--out", str(tmp_path / "cli"), "--steps", "2",
          "--batch-size", "2", "--device", "cpu", "--p-coarse", "1.0"])
    assert "checkpoint:" in capsys.readouterr().out
    assert isinstance(load_flexidit(tmp_path / "cli" / "checkpoint.pt"), FlexiDiT)


def test_flexi_flops_cli_json(capsys):
    main(["flexi-flops", "--arch", "DiT-lab-T", "--steps", "10", "--coarse-steps", "0,5,10", "--json"])
    report = json.loads(capsys.readouterr().out)
    fractions = [r["flops_fraction"] for r in report["schedules"]]
    native, coarse = lab_t_macs(16, 8), lab_t_macs(4, 16)
    assert fractions == pytest.approx([1.0, (native + coarse) / (2 * native), coarse / native])
    assert report["schedules"][1]["coarse_patch"] == 16
    main(["flexi-flops", "--arch", "DiT-lab-L", "--coarse-steps", "0,25"])
    assert "0.6217" in capsys.readouterr().out  # 25 of 50 steps at patch 8


# ---------------------------------------------------------------------------
# evaluate, compare
# ---------------------------------------------------------------------------


def test_evaluate_cli_records_results(tmp_path, capsys):
    model = dydit_lab.create_model("DiT-lab-T")
    torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "m.pt")
    results = tmp_path / "results.csv"
    main(["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--num-samples", "20", "--steps", "2",
          "--device", "cpu", "--results", str(results), "--name", "tiny"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_lenet"] > 0
    record_result(results, {"name": "other", "accuracy": 0.5})
    record_result(results, {"name": "tiny", "accuracy": 0.25})  # replaces, not appends
    rows = {r["name"]: r for r in read_results(results)}
    assert set(rows) == {"tiny", "other"} and rows["tiny"]["accuracy"] == "0.25"


def test_evaluate_complete_model_with_guidance(strategy_checkpoints, capsys):
    """A DyDiT's complete model sampled with classifier-free guidance (this used to crash:
    CompleteModel had no forward_with_cfg)."""
    main(["evaluate", "--checkpoint", str(strategy_checkpoints / "DyDiT-lab-L-0.5.pt"), "--complete-model",
          "--cfg-scale", "2", "--num-samples", "4", "--steps", "2", "--device", "cpu"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    static = analytic_flops(dydit_lab.create_model("DiT-lab-T").config)["total"] / 1e9
    assert metrics["cfg_scale"] == 2.0 and metrics["flops_fraction"] == 1.0
    assert metrics["gflops_per_image"] == pytest.approx(2 * 2 * static)  # 2 steps, both halves
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_lenet"] > 0


def test_evaluate_refuses_zero_samples(strategy_checkpoints, capsys):
    err = cli_error(capsys, ["evaluate", "--checkpoint", str(strategy_checkpoints / "DiT-lab-L.pt"),
                          "--num-samples", "0", "--steps", "2", "--device", "cpu"])
    assert "got 0" in err and "samples" in err


def test_compare_cli(strategy_checkpoints, tmp_path, capsys):
    main(["compare", "--only", "static: 10 steps", "--num-samples", "10",
          "--checkpoint-dir", str(strategy_checkpoints),
          "--results", str(tmp_path / "r.csv"), "--device", "cpu", "--timing-rounds", "1",
          "--timing-samples", "4"])
    assert "static: 10 steps" in capsys.readouterr().out
    assert list(strategy_table(tmp_path / "r.csv")["name"]) == ["static: 10 steps"]


# ---------------------------------------------------------------------------
# flops
# ---------------------------------------------------------------------------


def test_cli_flops_json(capsys):
    main(["flops", "--arch", "DiT-S/2", "--input-size", "32", "--json"])
    r = json.loads(capsys.readouterr().out)
    for key in ("arch", "input_size", "gflops", "gflops_fvcore_naive", "params_m", "tokens",
                "gflops_qkv", "gflops_attn_matmul", "gflops_mlp_fc1"):
        assert key in r
    assert r["arch"] == "DiT-S/2" and r["tokens"] == 256
    assert r["gflops"] == pytest.approx(6.07, rel=1e-3)
    assert r["gflops_fvcore"] == r["gflops"]
    main(["flops", "--arch", "DiT-lab-T"])
    assert "gflops:" in capsys.readouterr().out


def test_cli_flops_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["flops", "--arch", "DiT-XXL/2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "DiT-XXL/2" in err and "DiT-XL/2" in err and "DiT-lab-S" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["flops", "--arch", "DiT-S/8", "--input-size", "30"])
    assert exit_info.value.code == 2
    assert "not divisible" in capsys.readouterr().err


def test_flops_cli_counts_a_dydit_sampling_run(parent, tmp_path, capsys):
    dydit = DyDiT.from_dit(dydit_lab.load_model(parent))
    for block in dydit.blocks:  # close heads 2-3 at every t, keep all tokens
        block.attn_rate.router.bias.data = torch.tensor([15.0, -15.0, -15.0])
    torch.save({"ema": dydit.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "dy.pt")
    main(["flops", "--checkpoint", str(tmp_path / "dy.pt"), "--steps", "3", "--num-samples", "4",
          "--json", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["per_step_timesteps"] == [999, 500, 0]
    assert all(h == pytest.approx(0.5) for h in report["per_step_heads"])
    # Hand count: attention at half width in both blocks, everything else in full.
    cfg = dydit.config
    static = analytic_flops(cfg)["total"]
    full = dynamic_block_flops(cfg, 16, 4, 4, 16)
    half = dynamic_block_flops(cfg, 16, 2, 4, 16)
    expected = static + 2 * (half["attn"] - full["attn"] + full["sdt_router"] + full["tdw_router"])
    assert report["gflops_per_image_step"] * 1e9 == pytest.approx(expected)
    with pytest.raises(SystemExit):
        main(["flops", "--checkpoint", str(parent), "--json"])


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


def test_cli_json_and_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path / "data" / "bench")  # not the repository's data/bench
    out = tmp_path / "r.json"
    main(["bench", "--arch", BENCH_ARCH, "--target-ratio", "0.6", "--repeats", "1", "--device", "cpu",
          "--json", str(out), "--quiet"])
    record = json.loads(out.read_text())
    assert BENCH_RESULT_KEYS <= set(record) and abs(record["flops_ratio"] - 0.6) <= 0.02
    assert json.loads(capsys.readouterr().out) == record  # also printed
    assert record["conditioning_planned"] is True  # as a sampler does; --per-step-conditioning: not
    main(["bench", "--arch", BENCH_ARCH, "--repeats", "1", "--device", "cpu", "--per-step-conditioning", "--quiet"])
    assert json.loads(capsys.readouterr().out)["conditioning_planned"] is False

    main(["bench", "--arch", BENCH_ARCH, "--sweep-batch", "1,3", "--repeats", "1", "--device", "cpu",
          "--name", "tiny", "--quiet"])
    with open(tmp_path / "data" / "bench" / "tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch_size"]) for r in rows] == [1, 3]
    assert BENCH_RESULT_KEYS <= set(rows[0])
    assert len(json.loads(rows[0]["flops_ratio_per_step"])) == 4


def test_cli_times_a_trained_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path / "data" / "bench")
    path = tmp_path / "DyDiT-mine.pt"
    torch.save({"ema": random_dydit(0).state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    main(["bench", "--checkpoint", str(path), "--batch-size", "2", "--steps", "3", "--repeats", "1",
          "--threads", "1", "--quiet"])
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "DyDiT-mine" and record["batch_size"] == 2 and record["steps"] == 3
    assert record["num_threads"] == 1 and record["token_decisions_flipped"] == 0
    assert record["conditioning_planned"] is True
    main(["bench", "--checkpoint", str(path), "--sweep-batch", "1,2", "--steps", "2", "--repeats", "1", "--quiet"])
    with open(tmp_path / "data" / "bench" / "lab" / "cpu_dydit_mine_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch_size"]) for r in rows] == [1, 2] and rows[0]["checkpoint"] == str(path)
    main(["bench", "--checkpoint", str(path), "--sweep-batch", "2", "--steps", "2", "--repeats", "1", "--runs", "3",
          "--name", "three_runs", "--quiet"])
    with open(tmp_path / "data" / "bench" / "lab" / "three_runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["runs"]) == 3 and float(row["speedup"]) == sorted(json.loads(row["speedup_runs"]))[1]
    capsys.readouterr()  # tiny models' runs vary by more than 5 %: drop that warning before the next error
    assert "--runs must be positive" in cli_error(capsys, ["bench", "--checkpoint", str(path), "--runs", "0"])
    assert "not both" in cli_error(capsys, ["bench", "--arch", BENCH_ARCH, "--checkpoint", str(path)])
    assert "not both" in cli_error(capsys, ["bench"])


def test_cli_rejects_bad_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--arch", BENCH_ARCH, "--target-ratio", "1.5", "--device", "cpu", "--quiet"])
    assert exit_info.value.code == 2
    assert "cannot be reached" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


def test_export_cli(parent, tmp_path, capsys):
    main(["export", "--checkpoint", str(parent), "--out", str(tmp_path / "small.pt")])
    assert "wrote" in capsys.readouterr().out
    small = read_checkpoint(tmp_path / "small.pt")
    assert "opt" not in small and small["args"]["step"] == 10 and small["args"]["weights"] == "ema"
    assert type(dydit_lab.load_model(tmp_path / "small.pt")) is dydit_lab.DiT
    err = cli_error(capsys, ["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")])
    assert "none.pt" in err

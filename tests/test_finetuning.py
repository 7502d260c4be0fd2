"""FLOPs-constrained fine-tuning and the dynamic FLOPs count of a sampling run."""

import json

import pytest
import torch

import dydit_lab
from dydit_lab.cli import main
from dydit_lab.dydit import DyDiT
from dydit_lab.finetuning import FinetuneConfig, finetune, stratified_timesteps, target_at
from dydit_lab.training import TrainConfig, save_training_checkpoint


def test_target_schedule():
    cfg = FinetuneConfig(target_ratio=0.5, hold_steps=100, anneal_steps=1000)
    assert target_at(0, cfg) == 1.0 and target_at(99, cfg) == 1.0
    assert target_at(550, cfg) == pytest.approx(0.75)
    assert target_at(1000, cfg) == 0.5 and target_at(5000, cfg) == 0.5


def test_stratified_timesteps_cover_each_quarter():
    t = stratified_timesteps(64, 1000, torch.Generator().manual_seed(0))
    quarters = torch.bincount(t // 250, minlength=4)
    assert quarters.tolist() == [16, 16, 16, 16]


@pytest.fixture
def parent(tmp_path):
    model = dydit_lab.create_model("DiT-lab-T")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "parent.pt"
    save_training_checkpoint(path, model, model, opt, TrainConfig(arch="DiT-lab-T"), 10)
    return path


def test_finetune_smoke_moves_flops_toward_target(parent, tmp_path):
    cfg = FinetuneConfig(parent=str(parent), out=str(tmp_path / "ft"), target_ratio=0.5, steps=30,
                         hold_steps=2, anneal_steps=10, batch_size=8, router_lr=0.5,
                         flops_weight=50.0, device="cpu")
    path = finetune(cfg)
    rows = (tmp_path / "ft" / "log.csv").read_text().splitlines()
    assert len(rows) == 31 and "flops_fraction" in rows[0]
    first, last = (float(r.split(",")[3]) for r in (rows[1], rows[-1]))
    assert first > 0.97 and last < 0.95  # starts (almost) all on; the constraint pulled the routers
    model = dydit_lab.load_model(path)
    assert isinstance(model, DyDiT)
    with pytest.raises(FileExistsError):
        finetune(cfg)
    finetune(FinetuneConfig(**{**cfg.__dict__, "steps": 32, "resume": True}))
    assert len((tmp_path / "ft" / "log.csv").read_text().splitlines()) == 33


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
    from dydit_lab.flops import analytic_flops, dynamic_block_flops
    cfg = dydit.config
    static = analytic_flops(cfg)["total"]
    full = dynamic_block_flops(cfg, 16, 4, 4, 16)
    half = dynamic_block_flops(cfg, 16, 2, 4, 16)
    expected = static + 2 * (half["attn"] - full["attn"] + full["sdt_router"] + full["tdw_router"])
    assert report["gflops_per_image_step"] * 1e9 == pytest.approx(expected)
    with pytest.raises(SystemExit):
        main(["flops", "--checkpoint", str(parent), "--json"])

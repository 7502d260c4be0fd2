"""The one training loop: lr schedule, optimizer step with an override, EMA, stratified
timesteps, logs and resume, config checks."""

import pytest
import torch

from dydit_lab.training.loop import (LoopConfig, StepResult, append_log, check_loop_config, lr_factor,
                                     optimizer_step, restore_or_refuse, setup_distributed,
                                     stratified_timesteps, update_ema)
from dydit_lab.training.pretrain import TrainConfig, train


def lr_at(step, cfg):
    return cfg.lr * lr_factor(step, cfg)


def test_lr_schedule_warmup_constant_cooldown():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, decay_steps=20)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(80, cfg) == pytest.approx(1e-3) and lr_at(90, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(5e-5)
    assert lr_at(999, TrainConfig(steps=1000)) == pytest.approx(1e-3)  # constant by default
    with pytest.raises(ValueError, match="decay_steps"):
        train(TrainConfig(steps=10, decay_steps=11))


def test_optimizer_step_override_gives_some_parameters_their_own_loss():
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.SGD([a, b], lr=0.1)
    optimizer_step(StepResult(a + b, {}, override=([a], 10 * a)), [a, b], opt, grad_clip=0.0)
    assert a.grad.item() == 10.0 and b.grad.item() == 1.0
    assert a.item() == pytest.approx(0.0, abs=1e-6) and b.item() == pytest.approx(0.9)


def test_optimizer_step_clips_and_ema_follows():
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([a], lr=1.0)
    optimizer_step(StepResult((a * torch.tensor([3.0, 4.0])).sum(), {}), [a], opt, grad_clip=1.0)
    assert torch.allclose(a.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))  # gradient norm 5 clipped to 1
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = ema.weight.detach().clone()
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight.detach())
    frozen, copy = torch.nn.Linear(3, 3).requires_grad_(False), torch.nn.Linear(3, 3)
    copy.load_state_dict(frozen.state_dict())
    for _ in range(50):
        update_ema(copy, frozen, 0.9995)
    assert torch.equal(copy.weight, frozen.weight)  # a frozen weight's EMA is the weight, bit for bit


def test_stratified_timesteps_cover_each_quarter():
    t = stratified_timesteps(64, 1000, torch.Generator().manual_seed(0))
    quarters = torch.bincount(t // 250, minlength=4)
    assert quarters.tolist() == [16, 16, 16, 16]
    t = stratified_timesteps(64, 1000, torch.Generator().manual_seed(0), low=600)
    assert torch.bincount((t - 600) // 100, minlength=4).tolist() == [16] * 4


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    # A run killed between checkpoints has logged steps the resumed run will repeat.
    cfg = TrainConfig(arch="DiT-lab-T", out=str(tmp_path), steps=2, batch_size=4)
    train(cfg)
    log = tmp_path / "log.csv"
    with open(log, "a") as f:
        f.write("3,0.5,0.001,0,,\n4,0.5,0.001,0,,\n")
    train(TrainConfig(**{**cfg.__dict__, "steps": 4, "resume": True}))
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]


def test_append_log_keeps_an_existing_header(tmp_path):
    log = tmp_path / "log.csv"
    append_log(log, {"step": 1, "loss": 0.123456, "extra": 1}, ["step", "loss"])
    append_log(log, {"step": 2, "loss": 0.5, "new": 3}, ["step", "loss", "new"])  # columns changed
    assert log.read_text().splitlines() == ["step,loss", "1,0.12346", "2,0.50000"]


def test_restore_or_refuse(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    assert restore_or_refuse(tmp_path / "none.pt", False, model, model, opt) == 0
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_or_refuse(tmp_path / "none.pt", True, model, model, opt)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict(), "step": 5},
               tmp_path / "c.pt")
    with pytest.raises(FileExistsError, match="--resume"):
        restore_or_refuse(tmp_path / "c.pt", False, model, model, opt)
    assert restore_or_refuse(tmp_path / "c.pt", True, model, model, opt) == 5


def test_loop_config_is_checked(monkeypatch):
    check_loop_config(LoopConfig(batch_size=8), world=2)
    for cfg, world, match in [(LoopConfig(steps=0), 1, "steps"), (LoopConfig(batch_size=7), 2, "divisible"),
                              (LoopConfig(precision="fp16"), 1, "precision")]:
        with pytest.raises(ValueError, match=match):
            check_loop_config(cfg, world)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed(torch.device("cpu")) == (0, 1)  # no torchrun: one process, no group

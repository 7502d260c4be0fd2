"""Training loop: checkpoints, resume, refusal to overwrite, DDP with gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dydit_lab.checkpoints import read_checkpoint
from dydit_lab.cli import main
from dydit_lab.training import TrainConfig, lr_at, train

ROOT = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_constant_cooldown():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, decay_steps=20)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(80, cfg) == pytest.approx(1e-3) and lr_at(90, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(5e-5)
    assert lr_at(999, TrainConfig(steps=1000)) == pytest.approx(1e-3)  # constant by default
    with pytest.raises(ValueError, match="decay_steps"):
        train(TrainConfig(steps=10, decay_steps=11))


def test_train_resume_and_refuse_overwrite(tmp_path):
    cfg = TrainConfig(arch="DiT-lab-T", out=str(tmp_path), steps=4, batch_size=8, ckpt_every=2)
    path = train(cfg)
    first = read_checkpoint(path)
    assert first["step"] == 4 and set(first) >= {"model", "ema", "opt", "args"}
    assert (tmp_path / "log.csv").read_text().count("\n") == 5
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    train(TrainConfig(**{**cfg.__dict__, "steps": 6, "resume": True}))
    second = read_checkpoint(path)
    assert second["step"] == 6
    changed = [k for k in first["model"] if not torch.equal(first["model"][k], second["model"][k])]
    assert changed  # training went on from the saved weights
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp files


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


def test_cli_train_and_missing_resume(tmp_path, capsys):
    main(["train", "--arch", "DiT-lab-T", "--out", str(tmp_path / "a"), "--steps", "2",
          "--batch-size", "4"])
    assert "checkpoint:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["train", "--arch", "DiT-lab-T", "--out", str(tmp_path / "b"), "--steps", "2", "--resume"])
    assert err.value.code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_ddp_gloo_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dydit_lab", "train", "--arch", "DiT-lab-T", "--out", str(tmp_path), "--steps", "3",
           "--batch-size", "8", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])


def test_config_comments_are_the_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 disables the min-SNR weighting (default: 5.0)" in text
    assert "--resume go on from OUT/checkpoint.pt" in text

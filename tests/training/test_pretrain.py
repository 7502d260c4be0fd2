"""Pre-training a DiT: checkpoints, resume, refusal to overwrite, image folders."""

import pytest
import torch

import dydit_lab
from dydit_lab.checkpoints import read_checkpoint
from dydit_lab.training.pretrain import PretrainObjective, TrainConfig, train
from tests.helpers import write_image_folder


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


def test_train_on_an_image_folder(tmp_path):
    data = write_image_folder(tmp_path / "digits", classes=3, per_class=4)
    cfg = TrainConfig(arch="DiT-lab-T", data=str(data), out=str(tmp_path / "run"), steps=2, batch_size=4)
    ckpt = read_checkpoint(train(cfg))
    assert ckpt["step"] == 2 and ckpt["args"]["data"] == str(data)
    assert isinstance(dydit_lab.load_model(tmp_path / "run" / "checkpoint.pt"), dydit_lab.DiT)
    # Images of another size are resized to the model's input.
    other = write_image_folder(tmp_path / "big", classes=2, per_class=2, size=48)
    cfg = TrainConfig(arch="DiT-lab-T", data=str(other), out=str(tmp_path / "big-run"), steps=1, batch_size=2)
    assert read_checkpoint(train(cfg))["step"] == 1


def test_pretrain_objective_trains_every_parameter_at_one_lr():
    cfg = TrainConfig(arch="DiT-lab-T", lr=3e-4)
    objective = PretrainObjective(cfg)
    model = objective.build(torch.device("cpu"))
    (group,) = objective.param_groups(model)
    assert group["lr"] == 3e-4 and len(group["params"]) == len(list(model.parameters()))
    assert objective.checkpoint_extra(model) == {}

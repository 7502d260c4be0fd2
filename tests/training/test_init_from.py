"""`train --init-from`: the fair static baseline (the parent trained on, without routers)."""

import pytest
import torch

from dydit_lab import create_model, load_model
from dydit_lab.checkpoints import atomic_save
from dydit_lab.models.dydit import DyDiT
from dydit_lab.training.pretrain import TrainConfig, train


def test_init_from_starts_at_the_parent_weights(tmp_path):
    parent = create_model("DiT-lab-T")
    torch.nn.init.normal_(parent.final_layer.linear.weight)  # not the zero init of a fresh model
    atomic_save({"ema": parent.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "parent.pt")
    cfg = TrainConfig(arch="DiT-lab-T", out=str(tmp_path / "run"), steps=1, batch_size=4, lr=0.0,
                      warmup_steps=0, init_from=str(tmp_path / "parent.pt"), device="cpu", ema_decay=0.0)
    trained = load_model(train(cfg))
    for name, value in parent.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name  # lr 0: still the parent


def test_init_from_refuses_a_dydit_or_another_arch(tmp_path):
    atomic_save({"ema": DyDiT.from_dit(create_model("DiT-lab-T")).state_dict(), "args": {"arch": "DiT-lab-T"}},
                tmp_path / "dydit.pt")
    with pytest.raises(ValueError, match="holds a DyDiT"):
        train(TrainConfig(arch="DiT-lab-T", out=str(tmp_path / "a"), steps=1, init_from=str(tmp_path / "dydit.pt")))
    atomic_save({"ema": create_model("DiT-lab-T").state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="not a DiT-lab-S DiT"):
        train(TrainConfig(arch="DiT-lab-S", out=str(tmp_path / "b"), steps=1, init_from=str(tmp_path / "t.pt")))

"""finetune --routers tdw|sdt: the TDW-only and SDT-only ablations."""

import pytest
import torch

from dydit_lab import create_model, load_model
from dydit_lab.checkpoints import atomic_save, export_checkpoint
from dydit_lab.training.dydit import FinetuneConfig, finetune


@pytest.fixture
def parent(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "parent.pt"
    atomic_save({"ema": create_model("DiT-lab-T").state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    return path


def run(parent, tmp_path, routers):
    cfg = FinetuneConfig(parent=str(parent), out=str(tmp_path / routers), steps=12, batch_size=8,
                         hold_steps=0, anneal_steps=2, noise_off_step=0, target_ratio=0.3,
                         routers=routers, device="cpu", router_lr=0.5, tdw_init_bias=1.0, sdt_init_bias=1.0)
    checkpoint = finetune(cfg)
    model = load_model(export_checkpoint(checkpoint, tmp_path / f"{routers}.pt", weights="model"))  # online weights
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 300, 600, 900]), torch.arange(4)
    with torch.no_grad():
        return model(x, t, y, return_routing=True)[1]


def test_tdw_only_keeps_every_token_and_sdt_only_keeps_full_width(parent, tmp_path):
    tdw = run(parent, tmp_path, "tdw")
    assert tdw.tokens.all()
    sdt = run(parent, tmp_path, "sdt")
    assert sdt.heads.all() and sdt.groups.all()
    assert not (tdw.heads.all() and tdw.groups.all())  # the trained kind did move
    assert not sdt.tokens.all()


def test_bad_router_choice(parent, tmp_path):
    with pytest.raises(ValueError, match="routers must be"):
        finetune(FinetuneConfig(parent=str(parent), out=str(tmp_path / "x"), routers="heads"))

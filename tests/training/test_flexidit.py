"""Fine-tuning a DiT into a FlexiDiT: timesteps per patch size, smoke run, reload and resume,
new layers only with distillation."""

import csv
import math

import pytest
import torch

import dydit_lab
from dydit_lab.checkpoints import load_flexidit
from dydit_lab.models.flexidit import FlexiDiT
from dydit_lab.training.flexidit import FlexiFinetuneConfig, FlexiObjective, check_flexi_config, flexi_finetune
from tests.helpers import inputs as _inputs


def _timesteps(cfg, batch, coarse, gen):
    """The timesteps the objective draws for a coarse (or native) batch."""
    objective = FlexiObjective(cfg)
    objective.coarse = coarse
    return objective.timesteps(batch, 1000, gen)


def test_finetune_timesteps():
    gen = torch.Generator().manual_seed(0)
    t = _timesteps(FlexiFinetuneConfig(), 64, True, gen)
    assert torch.bincount(t // 250, minlength=4).tolist() == [16] * 4
    t = _timesteps(FlexiFinetuneConfig(coarse_t_min=600), 64, True, gen)
    assert torch.bincount((t - 600) // 100, minlength=4).tolist() == [16] * 4
    t = _timesteps(FlexiFinetuneConfig(coarse_t_min=600, uniform_timesteps=True), 500, True, gen)
    assert t.min() >= 600 and t.max() < 1000 and len(t.unique()) > 100
    # coarse_t_min binds coarse batches only: native ones keep every noise level
    t = _timesteps(FlexiFinetuneConfig(coarse_t_min=600), 64, False, gen)
    assert torch.bincount(t // 250, minlength=4).tolist() == [16] * 4


def test_flexi_config_is_checked():
    for bad, match in [({"p_coarse": 1.5}, "p_coarse"), ({"train": "some"}, "train"),
                       ({"coarse_t_min": 1000}, "coarse_t_min"), ({"distill_weight": -1.0}, "distill_weight")]:
        with pytest.raises(ValueError, match=match):
            check_flexi_config(FlexiFinetuneConfig(**bad))
        with pytest.raises(ValueError, match=match):
            flexi_finetune(FlexiFinetuneConfig(**bad))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_flexi_finetune_smoke_reload_and_resume(parent, tmp_path):
    cfg = FlexiFinetuneConfig(parent=str(parent), out=str(tmp_path / "ft"), steps=6, batch_size=4,
                              p_coarse=0.5, device="cpu", seed=1)
    path = flexi_finetune(cfg)
    rows = _rows(tmp_path / "ft" / "log.csv")
    assert len(rows) == 6 and {r["patch"] for r in rows} <= {"8", "16"}
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    model = load_flexidit(path)
    assert isinstance(model, FlexiDiT) and model.coarse_patches == (16,) and not model.training
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["args"]["kind"] == "flexidit" and ckpt["step"] == 6
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["ema"].items())
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.isfinite(model(x, t, y, patch_size=16)).all()
    with pytest.raises(FileExistsError):
        flexi_finetune(cfg)
    flexi_finetune(FlexiFinetuneConfig(**{**cfg.__dict__, "steps": 8, "resume": True}))
    assert len(_rows(tmp_path / "ft" / "log.csv")) == 8
    assert torch.load(path, weights_only=True)["step"] == 8


def test_flexi_finetune_new_layers_only_with_distillation(parent, tmp_path):
    cfg = FlexiFinetuneConfig(parent=str(parent), out=str(tmp_path / "new"), steps=3, batch_size=4,
                              p_coarse=1.0, train="new", distill_weight=1.0, coarse_t_min=500,
                              device="cpu")
    ckpt = torch.load(flexi_finetune(cfg), weights_only=True)
    before = torch.load(parent, weights_only=True)["model"]
    after = ckpt["model"]
    assert all(torch.equal(after[k], v) for k, v in before.items())  # transformer frozen
    assert not torch.equal(after["flex_embedders.16.proj.weight"],
                           FlexiDiT.from_dit(dydit_lab.load_model(parent)).state_dict()["flex_embedders.16.proj.weight"])
    rows = _rows(tmp_path / "new" / "log.csv")
    assert [r["patch"] for r in rows] == ["16"] * 3 and all(float(r["distill"]) > 0 for r in rows)


def test_flexi_finetune_new_layers_only_trains_coarse_batches_only(parent, tmp_path):
    # p_coarse < 1 with a frozen transformer: native batches would have nothing to train.
    cfg = FlexiFinetuneConfig(parent=str(parent), out=str(tmp_path / "new"), steps=4, batch_size=2,
                              p_coarse=0.5, train="new", device="cpu")
    flexi_finetune(cfg)
    assert [r["patch"] for r in _rows(tmp_path / "new" / "log.csv")] == ["16"] * 4


def test_flexi_finetune_coarse_adapters_with_a_frozen_transformer(parent, tmp_path):
    cfg = FlexiFinetuneConfig(parent=str(parent), out=str(tmp_path / "lora"), steps=3, batch_size=4,
                              train="new", lora_rank=2, device="cpu")
    path = flexi_finetune(cfg)
    ckpt = torch.load(path, weights_only=True)
    before = torch.load(parent, weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in before.items())  # transformer frozen
    assert ckpt["args"]["lora_rank"] == 2 and ckpt["model"]["flex_lora.16.0.deltas.qkv.B"].abs().sum() > 0
    model = load_flexidit({"model": ckpt["model"], "args": ckpt["args"]})  # the online weights
    assert model.lora_rank == 2 and load_flexidit(path).lora_rank == 2
    x, t, y = _inputs(model)
    native = dydit_lab.load_model(parent).eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), native(x, t, y))
        assert torch.equal(load_flexidit(path)(x, t, y), native(x, t, y))  # the EMA of a frozen weight too
        assert torch.isfinite(model(x, t, y, patch_size=16)).all()
    flexi_finetune(FlexiFinetuneConfig(**{**cfg.__dict__, "steps": 4, "resume": True}))
    assert torch.load(path, weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match="lora_rank"):
        check_flexi_config(FlexiFinetuneConfig(lora_rank=-1))

"""load_model: raw state dicts, official training checkpoints, our exports, clear errors."""

import argparse

import pytest
import torch

import dydit_lab
from dydit_lab.checkpoints import (CheckpointError, atomic_save, checkpoint_kind, export_checkpoint, load_flexidit,
                                   read_checkpoint, save_training_checkpoint)
from dydit_lab.models.dydit import DyDiT
from dydit_lab.models.flexidit import FlexiDiT
from dydit_lab.training.pretrain import TrainConfig
from tests.helpers import inputs as _flexi_inputs


def _randomised(arch="DiT-S/8", **kw):
    model = dydit_lab.create_model(arch, **kw)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def _inputs(model, n=2):
    s, c = model.config.input_size, model.in_channels
    return torch.randn(n, c, s, s), torch.tensor([3, 900][:n]), torch.tensor([1, 0][:n])


def test_raw_state_dict_roundtrip(tmp_path):
    model = _randomised("DiT-S/8", input_size=16, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    loaded = dydit_lab.load_model(tmp_path / "raw.pt", arch="DiT-S/8")
    # num_classes, input_size, in_channels and learn_sigma were read off the weights.
    assert loaded.config == model.config
    x, t, y = _inputs(model)
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_official_training_checkpoint_prefers_ema(tmp_path):
    model = _randomised("DiT-S/8", input_size=16, num_classes=10)
    ema = _randomised("DiT-S/8", input_size=16, num_classes=10)
    args = argparse.Namespace(model="DiT-S/8", image_size=128, num_classes=10, global_batch_size=256)
    opt = torch.optim.Adam(model.parameters()).state_dict()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt, "args": args},
               tmp_path / "0100000.pt")
    loaded = dydit_lab.load_model(tmp_path / "0100000.pt")  # arch read from args.model
    x, t, y = _inputs(model)
    assert torch.equal(loaded(x, t, y), ema(x, t, y))


class Evil:
    """Stands for any class a malicious pickle could name."""


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": {}, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only") as refused:
        read_checkpoint(tmp_path / "evil.pt")
    message = str(refused.value)  # one line that names the refused class, not torch's essay
    assert "Evil" in message and "\n" not in message


def test_wrong_arch_names_the_mismatches():
    state = _randomised("DiT-S/8", input_size=16, num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as err:
        dydit_lab.load_model(state, arch="DiT-B/8")
    msg = str(err.value)
    assert "DiT-B/8" in msg and "shape mismatches" in msg and "blocks.0.attn.qkv.weight" in msg
    with pytest.raises(CheckpointError, match="unknown arch"):
        dydit_lab.load_model(state, arch="DiT-M/8")


def test_missing_and_unexpected_keys_are_listed():
    state = _randomised("DiT-S/8", input_size=16, num_classes=10).state_dict()
    state.pop("blocks.11.mlp.fc2.bias")
    state["blocks.12.mlp.fc2.bias"] = torch.zeros(384)
    with pytest.raises(CheckpointError) as err:
        dydit_lab.load_model(state, arch="DiT-S/8")
    assert "missing keys: blocks.11.mlp.fc2.bias" in str(err.value)
    assert "unexpected keys: blocks.12.mlp.fc2.bias" in str(err.value)


def test_no_arch_and_bad_files(tmp_path):
    state = _randomised("DiT-lab-T").state_dict()
    with pytest.raises(CheckpointError, match="pass arch="):
        dydit_lab.load_model(state)
    with pytest.raises(FileNotFoundError):
        dydit_lab.load_model(tmp_path / "missing.pt", arch="DiT-lab-T")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        dydit_lab.load_model(tmp_path / "junk.pt", arch="DiT-lab-T")
    torch.save({"step": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        dydit_lab.load_model(tmp_path / "odd.pt", arch="DiT-lab-T")


def test_explicit_options_override_and_are_checked():
    state = _randomised("DiT-S/8", input_size=16, num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match="y_embedder"):
        dydit_lab.load_model(state, arch="DiT-S/8", num_classes=1000)


def test_fp16_export(tmp_path):
    model = _randomised("DiT-lab-T")
    opt = torch.optim.AdamW(model.parameters())
    save_training_checkpoint(tmp_path / "ckpt.pt", model, model, opt, TrainConfig(arch="DiT-lab-T"), 7)
    export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "small.pt")
    small = read_checkpoint(tmp_path / "small.pt")
    assert "opt" not in small and small["args"]["step"] == 7
    assert small["ema"]["blocks.0.attn.qkv.weight"].dtype == torch.float16
    loaded = dydit_lab.load_model(tmp_path / "small.pt")
    x, t, y = _inputs(model)
    assert torch.allclose(loaded(x, t, y), model(x, t, y), atol=2e-3)


def test_export_online_weights(tmp_path):
    model, ema = _randomised("DiT-lab-T"), _randomised("DiT-lab-T")
    save_training_checkpoint(tmp_path / "ckpt.pt", model, ema, torch.optim.AdamW(model.parameters()),
                             TrainConfig(arch="DiT-lab-T"), 3)
    export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "online.pt", fp16=False, weights="model")
    loaded = dydit_lab.load_model(tmp_path / "online.pt")
    x, t, y = _inputs(model)
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert read_checkpoint(tmp_path / "online.pt")["args"]["weights"] == "model"
    with pytest.raises(ValueError, match="weights"):
        export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "x.pt", weights="best")


def test_load_flexidit_from_raw_state_dict_and_rejects_plain_dit(tiny, tmp_path):
    flexi = FlexiDiT.from_dit(tiny, coarse_patch=[16, 4])
    torch.save({"ema": flexi.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "f.pt")
    loaded = load_flexidit(tmp_path / "f.pt")
    assert loaded.coarse_patches == (4, 16)
    x, t, y = _flexi_inputs(tiny)
    with torch.no_grad():
        for q in (4, 8, 16):
            assert torch.allclose(loaded(x, t, y, patch_size=q), flexi.eval()(x, t, y, patch_size=q))
    with pytest.raises(ValueError, match="not a FlexiDiT"):
        load_flexidit({"ema": tiny.state_dict(), "args": {"arch": "DiT-lab-T"}})


def test_load_model_returns_a_flexidit(tiny, tmp_path):
    """dydit_lab.load_model hands FlexiDiT checkpoints (flex_* keys) to load_flexidit."""
    flexi = FlexiDiT.from_dit(tiny)
    torch.save({"ema": flexi.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "f.pt")
    model = dydit_lab.load_model(tmp_path / "f.pt")
    assert isinstance(model, FlexiDiT) and model.coarse_patches == (16,)


def test_training_checkpoint_records_kind_arch_and_extras(tmp_path, tiny):
    opt = torch.optim.AdamW(tiny.parameters())
    save_training_checkpoint(tmp_path / "dit.pt", tiny, tiny, opt, TrainConfig(arch="DiT-lab-T", lr=3e-4), 4)
    ckpt = read_checkpoint(tmp_path / "dit.pt")
    assert set(ckpt) == {"model", "ema", "opt", "args", "step"} and ckpt["step"] == 4
    args = ckpt["args"]
    assert (args["arch"], args["kind"], args["lr"]) == ("DiT-lab-T", "dit", 3e-4)
    assert args["model_config"]["patch_size"] == 8
    flexi = FlexiDiT.from_dit(tiny)
    save_training_checkpoint(tmp_path / "flexi.pt", flexi, flexi, torch.optim.AdamW(flexi.parameters()),
                             TrainConfig(arch="DiT-lab-T"), 1, coarse_patches=[16], resize="bilinear")
    args = read_checkpoint(tmp_path / "flexi.pt")["args"]
    assert args["kind"] == "flexidit" and args["coarse_patches"] == [16]
    assert checkpoint_kind(DyDiT.from_dit(tiny).state_dict()) == "dydit"
    assert isinstance(dydit_lab.load_model(tmp_path / "flexi.pt"), FlexiDiT)


def test_atomic_save_replaces_whole_files(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "sub" / "x.pt")
    atomic_save({"a": torch.zeros(2)}, tmp_path / "sub" / "x.pt")
    assert torch.equal(torch.load(tmp_path / "sub" / "x.pt")["a"], torch.zeros(2))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.pt"]

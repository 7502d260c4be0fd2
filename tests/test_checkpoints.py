"""load_model: raw state dicts, official training checkpoints, our exports, clear errors."""

import argparse

import pytest
import torch

import dydit_lab
from dydit_lab.checkpoints import CheckpointError, export_checkpoint, read_checkpoint


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
    from dydit_lab.training import TrainConfig, save_training_checkpoint

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
    from dydit_lab.training import TrainConfig, save_training_checkpoint

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

"""FlexiDiT: native path = parent, PI-resize initialisation, patch schedules, FLOPs, fine-tuning."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dydit_lab
from dydit_lab.cli import main
from dydit_lab.diffusion import GaussianDiffusion, space_timesteps
from dydit_lab.flexidit import (
    FlexiDiT, FlexiFinetuneConfig, PatchSchedule, coarse_pos_embed, flexi_finetune, load_flexidit,
    pi_resize_kernel, resize_matrix, schedule_flops, scheduled_model, sincos_pos_embed_at,
)
from dydit_lab.models import DiT, get_2d_sincos_pos_embed, get_config
from dydit_lab.training import TrainConfig, save_training_checkpoint


def _randomised(model):
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model.eval()


def _inputs(model, n=3, size=None):
    size = size or model.config.input_size
    x = torch.randn(n, model.in_channels, size, size)
    t = torch.tensor([999, 500, 3, 250][:n])
    y = torch.arange(n) % model.num_classes
    return x, t, y


@pytest.fixture
def tiny():
    return _randomised(dydit_lab.create_model("DiT-lab-T"))  # patch 8 on 32x32: coarse 16


@pytest.fixture
def small_sigma():
    # learn_sigma (2C outputs) and 4 channels, patch 2 on 8x8: coarse 4
    return _randomised(dydit_lab.create_model("DiT-S/2", input_size=8, num_classes=10))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "small_sigma"])
def test_native_path_equals_parent(name, request):
    dit = request.getfixturevalue(name)
    flexi = FlexiDiT.from_dit(dit).eval()
    x, t, y = _inputs(dit)
    with torch.no_grad():
        assert torch.equal(flexi(x, t, y), dit(x, t, y))
        assert torch.equal(flexi(x, t, y, patch_size=dit.patch_size), dit(x, t, y))
        xx, tt = torch.cat([x, x]), torch.cat([t, t])
        yy = torch.cat([y, torch.full_like(y, dit.num_classes)])
        assert torch.equal(flexi.forward_with_cfg(xx, tt, yy, 3.0), dit.forward_with_cfg(xx, tt, yy, 3.0))
    # Official keys kept; the additions are named by patch size.
    keys = set(flexi.state_dict())
    assert set(dit.state_dict()) <= keys
    q = 2 * dit.patch_size
    assert keys - set(dit.state_dict()) == {
        f"flex_embedders.{q}.proj.weight", f"flex_embedders.{q}.proj.bias",
        f"flex_final.{q}.weight", f"flex_final.{q}.bias", f"flex_pos_embed.{q}", f"flex_size_embed.{q}"}
    assert not flexi.flex_size_embed[str(q)].any()  # zero until fine-tuned: flexifying is a no-op


@pytest.mark.parametrize("name", ["tiny", "small_sigma"])
def test_coarse_path_shape_and_cost(name, request):
    dit = request.getfixturevalue(name)
    flexi = FlexiDiT.from_dit(dit).eval()
    q = 2 * dit.patch_size
    assert flexi.patch_sizes == (dit.patch_size, q)
    x, t, y = _inputs(dit)
    with torch.no_grad():
        out = flexi(x, t, y, patch_size=q)
        guided = flexi.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                        torch.cat([y, y]), 2.0, patch_size=q)
    assert out.shape == (3, flexi.out_channels, *x.shape[-2:]) and torch.isfinite(out).all()
    assert guided.shape == (6, flexi.out_channels, *x.shape[-2:])
    tokens, _, _ = flexi.embed_at(x, t, y, q)
    assert tokens.shape[1] == (dit.config.input_size // q) ** 2
    with pytest.raises(ValueError, match="not available"):
        flexi(x, t, y, patch_size=3)


def test_constructor_validates_patches(tiny):
    with pytest.raises(ValueError, match="native"):
        FlexiDiT(tiny.config, coarse_patches=8)
    with pytest.raises(ValueError, match="tile"):
        FlexiDiT(tiny.config, coarse_patches=12)
    assert FlexiDiT(tiny.config, coarse_patches=[16, 4]).patch_sizes == (8, 16, 4)
    from dydit_lab.dydit import DyDiT

    dydit = DyDiT.from_dit(tiny)
    with pytest.raises(TypeError):
        FlexiDiT.from_dit(dydit)


# ---------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------


def _patchwise_resize(z, p, q, mode):
    """Resize every p x p patch of z on its own to q x q (the operator PI-resize inverts)."""
    n, c, h, w = z.shape
    g = h // p
    patches = z.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(patches.double(), size=(q, q), mode=mode if mode == "bilinear" else "nearest-exact",
                       **kwargs).float()
    return up.reshape(n, g, g, c, q, q).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * q, g * q)


def test_resize_matrix_matches_interpolate():
    patch = torch.randn(5, 5, dtype=torch.float64)
    B = resize_matrix(5, 9)
    ref = F.interpolate(patch[None, None], size=(9, 9), mode="bilinear", align_corners=False)
    assert torch.allclose(B @ patch.reshape(-1), ref.reshape(-1))
    assert torch.allclose(B.sum(1), torch.ones(81, dtype=torch.float64))  # constants preserved


@pytest.mark.parametrize("name", ["tiny", "small_sigma"])
def test_pi_resize_embedding_equals_native_token_of_the_original_patch(name, request):
    """PI-resize: <B z, w'> = <z, w> — a coarse token of per-patch upsampled content is the
    native token of that content; in particular a constant image gives the native tokens."""
    dit = request.getfixturevalue(name)
    flexi = FlexiDiT.from_dit(dit)
    p, q = dit.patch_size, 2 * dit.patch_size
    z = torch.randn(2, dit.in_channels, dit.config.input_size // 2, dit.config.input_size // 2)
    x = _patchwise_resize(z, p, q, "bilinear")
    proj = dit.x_embedder.proj
    native = F.conv2d(z, proj.weight, proj.bias, stride=p)
    coarse = flexi.flex_embedders[str(q)].proj(x)
    assert torch.allclose(coarse, native, atol=1e-5)
    const = torch.full((1, dit.in_channels, dit.config.input_size, dit.config.input_size), 0.7)
    assert torch.allclose(flexi.flex_embedders[str(q)].proj(const).flatten(2).mean(-1),
                          proj(const).flatten(2).mean(-1), atol=1e-5)


def test_pi_resize_nearest_is_average_pooling(tiny):
    flexi = FlexiDiT.from_dit(tiny, resize="nearest")
    x = torch.randn(2, 1, 32, 32)
    proj = tiny.x_embedder.proj
    expected = F.conv2d(F.avg_pool2d(x, 2), proj.weight, proj.bias, stride=8)
    assert torch.allclose(flexi.flex_embedders["16"].proj(x), expected, atol=1e-5)
    # The kernel is the native one spread over 2x2 blocks, divided by 4.
    w = pi_resize_kernel(proj.weight, 16, "nearest")
    assert torch.allclose(w, proj.weight.repeat_interleave(2, -1).repeat_interleave(2, -2) / 4, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "small_sigma"])
def test_de_embedding_outputs_the_resized_native_patch(name, request):
    dit = request.getfixturevalue(name)
    flexi = FlexiDiT.from_dit(dit)
    p, q, c = dit.patch_size, 2 * dit.patch_size, dit.out_channels
    h = torch.randn(7, dit.config.hidden_size)
    native = dit.final_layer.linear(h).reshape(7, p, p, c).permute(0, 3, 1, 2)
    coarse = flexi.flex_final[str(q)](h).reshape(7, q, q, c).permute(0, 3, 1, 2)
    expected = F.interpolate(native.double(), size=(q, q), mode="bilinear", align_corners=False)
    assert torch.allclose(coarse.double(), expected, atol=1e-5)


def test_nearest_grid_coarse_path_is_the_dit_at_half_resolution(tiny):
    """With nearest resize and the coarse grid's own sin-cos table the whole coarse forward is
    the same DiT built for a half-size input, run on the 2x pooled image, output upsampled."""
    flexi = FlexiDiT.from_dit(tiny, resize="nearest", pos="grid").eval()
    half = DiT(get_config("DiT-lab-T", input_size=16)).eval()
    state = {k: v for k, v in tiny.state_dict().items() if k != "pos_embed"}
    missing, unexpected = half.load_state_dict(state, strict=False)
    assert missing == ["pos_embed"] and not unexpected
    x, t, y = _inputs(tiny)
    with torch.no_grad():
        expected = F.interpolate(half(F.avg_pool2d(x, 2), t, y), scale_factor=2, mode="nearest")
        assert torch.allclose(flexi(x, t, y, patch_size=16), expected, atol=1e-5)


def test_positions():
    D = 32
    ref = get_2d_sincos_pos_embed(D, 8)
    assert np.allclose(sincos_pos_embed_at(D, np.arange(8), np.arange(8)), ref)
    assert np.allclose(coarse_pos_embed(D, 32, 4, 4), ref)  # native patch: native table
    centres = np.arange(4) * 2 + 0.5  # a coarse 8-patch covers native positions 2i, 2i+1
    assert np.allclose(coarse_pos_embed(D, 32, 4, 8), sincos_pos_embed_at(D, centres, centres))
    assert np.allclose(coarse_pos_embed(D, 32, 4, 8, mode="grid"), get_2d_sincos_pos_embed(D, 4))
    flexi = FlexiDiT(get_config("DiT-lab-L"))
    assert not flexi.flex_pos_embed["8"].requires_grad
    assert torch.allclose(flexi.flex_pos_embed["8"][0].double(),
                          torch.from_numpy(coarse_pos_embed(128, 32, 4, 8)), atol=1e-6)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_schedule_uses_coarse_patch_for_the_noisiest_steps(tiny, cfg_scale):
    flexi = FlexiDiT.from_dit(tiny).eval()
    sched = scheduled_model(flexi, coarse_steps=3, total_steps=10)
    diffusion = GaussianDiffusion(learn_sigma=False).respaced(10)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        diffusion.sample(sched, y, (2, 1, 32, 32), method="ddim", cfg_scale=cfg_scale, progress=False)
    expected_t = sorted(space_timesteps(1000, 10), reverse=True)
    assert [t for t, _ in sched.calls] == expected_t
    assert [p for _, p in sched.calls] == [16] * 3 + [8] * 7
    assert [sched.patch_for(t) for t in expected_t] == [16] * 3 + [8] * 7


def test_schedule_extremes_and_mixed_batches(tiny):
    flexi = FlexiDiT.from_dit(tiny).eval()
    x, t, y = _inputs(tiny, n=4)  # t = 999, 500, 3, 250
    with torch.no_grad():
        never = PatchSchedule(flexi, 0, 50)
        assert torch.equal(never(x, t, y), flexi(x, t, y)) and never.calls == [(999, 8)]
        always = PatchSchedule(flexi, 50, 50)
        assert torch.equal(always(x, t, y), flexi(x, t, y, patch_size=16))
        half = PatchSchedule(flexi, 25, 50)  # coarse for t >= the 25th noisiest of 50 steps
        out = half(x, t, y)
        assert half.calls == [(999, "mixed")] and half.threshold == sorted(space_timesteps(1000, 50))[25]
        coarse = t >= half.threshold
        assert torch.allclose(out[coarse], flexi(x[coarse], t[coarse], y[coarse], patch_size=16), atol=1e-6)
        assert torch.allclose(out[~coarse], flexi(x[~coarse], t[~coarse], y[~coarse]), atol=1e-6)
    with pytest.raises(ValueError):
        PatchSchedule(flexi, 11, 10)
    with pytest.raises(TypeError):
        PatchSchedule(tiny, 1, 10)


def test_schedule_works_with_generate(tiny):
    from dydit_lab.evaluation import generate

    sched = scheduled_model(FlexiDiT.from_dit(tiny), coarse_steps=2, total_steps=4)
    samples, labels = generate(sched, 3, steps=4, batch_size=3, progress=False)
    assert samples.shape == (3, 1, 32, 32) and torch.isfinite(samples).all()
    assert [p for _, p in sched.calls] == [16, 16, 8, 8]


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------


def _hand_macs(tokens: int, patch: int) -> int:
    """DiT-lab-T (depth 2, D 32, 1 channel, 32x32, MLP 128, 256 frequencies), one forward."""
    D, depth = 32, 2
    return (tokens * D * patch * patch  # patch embedding conv
            + 256 * D + D * D  # timestep MLP
            + depth * 6 * D * D  # adaLN
            + (2 * depth + 1) * tokens * D * 4  # LayerNorms
            + depth * (tokens * D * 3 * D + 2 * tokens * tokens * D + tokens * D * D)  # attention
            + depth * 2 * tokens * D * 128  # MLP
            + 2 * D * D  # final adaLN
            + tokens * D * patch * patch  # final linear (1 output channel)
            + 32 * 32 // 2)  # unpatchify einsum charge


def test_schedule_flops_hand_count():
    native, coarse = _hand_macs(16, 8), _hand_macs(4, 16)
    report = schedule_flops("DiT-lab-T", 16, 3, 10)
    assert report["native_macs"] == native and report["coarse_macs"] == coarse
    assert report["total_macs"] == 3 * coarse + 7 * native
    assert report["gflops_per_image_step"] == pytest.approx((3 * coarse + 7 * native) / 10 / 1e9)
    assert report["flops_fraction"] == pytest.approx((3 * coarse + 7 * native) / (10 * native))
    assert schedule_flops("DiT-lab-T", None, 0, 10)["flops_fraction"] == 1.0
    assert schedule_flops("DiT-lab-T", None, 10, 10)["flops_fraction"] == pytest.approx(coarse / native)
    with pytest.raises(ValueError):
        schedule_flops("DiT-lab-T", 16, 11, 10)


def test_coarse_forward_cost_matches_fvcore(tiny):
    """An independent count: fvcore traces the coarse forward itself."""
    from dydit_lab.flops import fvcore_flops

    class Coarse(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.x_embedder = model, model.x_embedder
            self.in_channels, self.num_classes = model.in_channels, model.num_classes

        def forward(self, x, t, y):
            return self.model(x, t, y, patch_size=16)

    flexi = FlexiDiT.from_dit(tiny)
    assert fvcore_flops(Coarse(flexi)) == schedule_flops("DiT-lab-T", 16, 1, 1)["coarse_macs"]
    assert fvcore_flops(flexi) == schedule_flops("DiT-lab-T", 16, 0, 1)["native_macs"]


def test_flexi_flops_cli_json(capsys):
    main(["flexi-flops", "--arch", "DiT-lab-T", "--steps", "10", "--coarse-steps", "0,5,10", "--json"])
    report = json.loads(capsys.readouterr().out)
    fractions = [r["flops_fraction"] for r in report["schedules"]]
    native, coarse = _hand_macs(16, 8), _hand_macs(4, 16)
    assert fractions == pytest.approx([1.0, (native + coarse) / (2 * native), coarse / native])
    assert report["schedules"][1]["coarse_patch"] == 16
    main(["flexi-flops", "--arch", "DiT-lab-L", "--coarse-steps", "0,25"])
    assert "0.6217" in capsys.readouterr().out  # 25 of 50 steps at patch 8


# ---------------------------------------------------------------------------
# Fine-tuning and loading
# ---------------------------------------------------------------------------


def test_finetune_timesteps():
    from dydit_lab.flexidit import _timesteps

    gen = torch.Generator().manual_seed(0)
    t = _timesteps(FlexiFinetuneConfig(), 64, 0, gen)
    assert torch.bincount(t // 250, minlength=4).tolist() == [16] * 4
    t = _timesteps(FlexiFinetuneConfig(), 64, 600, gen)
    assert torch.bincount((t - 600) // 100, minlength=4).tolist() == [16] * 4
    t = _timesteps(FlexiFinetuneConfig(uniform_timesteps=True), 500, 600, gen)
    assert t.min() >= 600 and t.max() < 1000 and len(t.unique()) > 100


@pytest.fixture
def parent(tmp_path, tiny):
    opt = torch.optim.AdamW(tiny.parameters())
    path = tmp_path / "parent.pt"
    save_training_checkpoint(path, tiny, tiny, opt, TrainConfig(arch="DiT-lab-T"), 10)
    return path


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


def test_flexi_finetune_cli(parent, tmp_path, capsys):
    main(["flexi-finetune", "--parent", str(parent), "--out", str(tmp_path / "cli"), "--steps", "2",
          "--batch-size", "2", "--device", "cpu", "--p-coarse", "1.0"])
    assert "checkpoint:" in capsys.readouterr().out
    assert isinstance(load_flexidit(tmp_path / "cli" / "checkpoint.pt"), FlexiDiT)


def test_load_flexidit_from_raw_state_dict_and_rejects_plain_dit(tiny, tmp_path):
    flexi = FlexiDiT.from_dit(tiny, coarse_patch=[16, 4])
    torch.save({"ema": flexi.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "f.pt")
    loaded = load_flexidit(tmp_path / "f.pt")
    assert loaded.coarse_patches == (4, 16)
    x, t, y = _inputs(tiny)
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

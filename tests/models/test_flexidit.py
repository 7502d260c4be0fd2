"""FlexiDiT, the model: native path = parent, PI-resize initialisation, patch schedules, cost."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dydit_lab.diffusion import GaussianDiffusion, space_timesteps
from dydit_lab.models.flops import fvcore_flops, schedule_flops
from dydit_lab.models.configs import get_config
from dydit_lab.models.dit import DiT, get_2d_sincos_pos_embed
from dydit_lab.models.dydit import DyDiT
from dydit_lab.models.adapters import lora_rank_in
from dydit_lab.models.flexidit import (FlexiDiT, PatchSchedule, coarse_pos_embed, flex_patches_in,
                                       pi_resize_kernel, resize_matrix, resize_output_linear,
                                       scheduled_model, sincos_pos_embed_at)
from tests.helpers import inputs as _inputs


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
    dydit = DyDiT.from_dit(tiny)
    with pytest.raises(TypeError):
        FlexiDiT.from_dit(dydit)


@pytest.mark.parametrize("name", ["tiny", "small_sigma"])
def test_coarse_adapters_leave_the_native_path_and_start_as_no_op(name, request):
    dit = request.getfixturevalue(name)
    plain, adapted = FlexiDiT.from_dit(dit).eval(), FlexiDiT.from_dit(dit, lora_rank=3).eval()
    q = 2 * dit.patch_size
    x, t, y = _inputs(dit)
    with torch.no_grad():
        assert torch.equal(adapted(x, t, y), dit(x, t, y))
        assert torch.equal(adapted(x, t, y, patch_size=q), plain(x, t, y, patch_size=q))  # B = 0 at init
    extra = set(adapted.state_dict()) - set(plain.state_dict())
    assert extra == {f"flex_lora.{q}.{i}.deltas.{n}.{ab}" for i in range(dit.config.depth)
                     for n in ("qkv", "proj", "fc1", "fc2") for ab in "AB"}
    assert adapted.flex_lora[str(q)][0].deltas["fc1"].A.shape == (3, dit.config.hidden_size)
    assert lora_rank_in(adapted.state_dict()) == 3 and lora_rank_in(plain.state_dict()) == 0
    assert {id(p) for p in adapted.flex_lora.parameters()} <= {id(p) for p in adapted.new_parameters()}
    with pytest.raises(ValueError, match="lora_rank"):
        FlexiDiT(dit.config, lora_rank=-1)


def test_coarse_adapters_change_the_coarse_path_with_and_without_autograd(tiny):
    flexi = FlexiDiT.from_dit(tiny, lora_rank=2).eval()
    before = FlexiDiT.from_dit(tiny).eval()
    x, t, y = _inputs(tiny)
    with torch.no_grad():
        first = flexi(x, t, y, patch_size=16)  # merges and caches
        for delta in flexi.flex_lora["16"][1].deltas.values():
            delta.B.normal_(0, 0.1)  # an in-place change must invalidate the cached merge
        changed = flexi(x, t, y, patch_size=16)
        assert torch.equal(first, before(x, t, y, patch_size=16))
        assert not torch.allclose(changed, first)
        assert torch.equal(flexi(x, t, y), tiny(x, t, y))
        # The adapted coarse path is the plain coarse path with W + B A in block 1.
        adapter, block = flexi.flex_lora["16"][1], before.blocks[1]
        for name, path in (("qkv", "attn.qkv"), ("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            block.get_submodule(path).weight += adapter.deltas[name]()
        assert torch.allclose(before(x, t, y, patch_size=16), changed, atol=1e-6)
    with_grad = flexi(x, t, y, patch_size=16)
    assert torch.allclose(with_grad, changed, atol=1e-6)
    with_grad.square().mean().backward()
    assert flexi.flex_lora["16"][1].deltas["qkv"].B.grad.abs().sum() > 0
    assert flexi.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the shared weight is in the graph too


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



# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------




def test_coarse_forward_cost_matches_fvcore(tiny):
    """An independent count: fvcore traces the coarse forward itself."""
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


def test_sampling_cost_of_a_schedule_is_its_exact_mix(tiny):
    flexi = FlexiDiT.from_dit(tiny)
    native = schedule_flops("DiT-lab-T", 16, 0, 10)
    assert flexi.sampling_cost(10) == {"gflops_per_step": native["native_gflops"], "flops_fraction": 1.0}
    cost = scheduled_model(flexi, coarse_steps=3, total_steps=10).sampling_cost(10)
    mix = schedule_flops("DiT-lab-T", 16, 3, 10)
    assert cost == {"gflops_per_step": mix["gflops_per_image_step"], "flops_fraction": mix["flops_fraction"]}
    assert cost["flops_fraction"] < 1


def test_resized_output_linear_and_patch_keys(tiny):
    w, b = tiny.final_layer.linear.weight, tiny.final_layer.linear.bias
    new_w, new_b = resize_output_linear(w, b, 8, 16, tiny.out_channels)
    assert new_w.shape == (16 * 16, 32) and new_b.shape == (16 * 16,)
    same_w, same_b = resize_output_linear(w, b, 8, 8, tiny.out_channels)  # identity resize
    assert torch.allclose(same_w, w, atol=1e-6) and torch.allclose(same_b, b, atol=1e-6)
    assert flex_patches_in(FlexiDiT.from_dit(tiny, coarse_patch=[16, 4]).state_dict()) == [4, 16]
    assert flex_patches_in(tiny.state_dict()) == []


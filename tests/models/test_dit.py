"""DiT architecture: official layout, shapes, initialisation, guidance, input errors."""

import pytest
import torch

import dydit_lab
from dydit_lab.models.configs import DiTConfig
from dydit_lab.models.dit import DiT

# Parameter counts of the official models (DiT paper / official repo), at 256 px.
OFFICIAL_PARAMS_M = {"DiT-S/2": 33.0, "DiT-B/2": 130.5, "DiT-L/2": 458.1, "DiT-XL/2": 675.1}


@pytest.mark.parametrize("arch", list(OFFICIAL_PARAMS_M))
def test_official_parameter_counts(arch):
    with torch.device("meta"):
        model = dydit_lab.create_model(arch)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(OFFICIAL_PARAMS_M[arch], abs=0.1)


def test_official_state_dict_names():
    model = dydit_lab.create_model("DiT-S/8", input_size=8, num_classes=10)
    keys = set(model.state_dict())
    for key in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight",
                "blocks.0.attn.proj.bias", "blocks.11.mlp.fc1.weight", "blocks.11.mlp.fc2.weight",
                "blocks.3.adaLN_modulation.1.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.bias"]:
        assert key in keys
    assert model.y_embedder.embedding_table.weight.shape == (11, 384)  # + the CFG null class


@pytest.mark.parametrize("learn_sigma,channels", [(True, 8), (False, 4)])
def test_output_shape(learn_sigma, channels):
    model = dydit_lab.create_model("DiT-S/4", input_size=16, learn_sigma=learn_sigma, num_classes=10)
    out = model(torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, channels, 16, 16)


def test_adaln_zero_starts_at_zero_output():
    model = dydit_lab.create_model("DiT-lab-T").eval()
    out = model(torch.randn(2, 1, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_unpatchify_inverts_patchify_layout():
    model = dydit_lab.create_model("DiT-lab-T")
    p, c = model.patch_size, model.out_channels
    img = torch.randn(2, c, 32, 32)
    # Patch tokens in (p, q, c) order, row-major over the grid: the layout the final layer emits.
    tokens = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(2, -1, p * p * c)
    assert torch.equal(model.unpatchify(tokens), img)


def test_cfg_scale_one_is_conditional_output():
    torch.manual_seed(1)
    model = dydit_lab.create_model("DiT-lab-T").eval()
    for prm in model.parameters():
        prm.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([10, 10]), torch.tensor([4, 10])
    guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
    plain = model(torch.cat([x[:1], x[:1]]), t, y)
    assert torch.allclose(guided[:1], plain[:1], atol=1e-6)


@pytest.mark.parametrize("bad", [(2, 1, 32, 16), (2, 3, 32, 32), (2, 1, 16, 16)])
def test_bad_input_shapes_raise(bad):
    model = dydit_lab.create_model("DiT-lab-T")
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(bad), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))



def official_tiny_dit(fx):
    """Our DiT built with the fixture's official constructor keywords, weights loaded strictly."""
    keys = ("depth", "hidden_size", "patch_size", "num_heads", "input_size", "in_channels",
            "num_classes", "learn_sigma", "class_dropout_prob", "mlp_ratio")
    model = DiT(DiTConfig(**{k: fx["config"][k] for k in keys})).eval()
    model.load_state_dict(fx["state_dict"])
    return model


def test_matches_official_dit_outputs(official_dit):
    """Official weights and outputs from facebookresearch/DiT (see tests/fixtures/README.md)."""
    fx = official_dit
    with torch.no_grad():
        out = official_tiny_dit(fx)(fx["x"], fx["t"], fx["y"])
    assert (out - fx["out"]).norm() / fx["out"].norm() < 1e-4


def test_cfg_matches_official_on_guided_and_variance_channels(official_dit):
    """The official code guides eps channels 0-2 only; we guide all eps channels (documented)."""
    fx = official_dit
    with torch.no_grad():
        out = official_tiny_dit(fx).forward_with_cfg(fx["cfg_x"], fx["cfg_t"], fx["cfg_y"], fx["cfg_scale"])
    same = [0, 1, 2, 4, 5, 6, 7]
    assert torch.allclose(out[:2, same], fx["cfg_out"][:2, same], atol=1e-5)


def test_class_labels_past_the_null_label_are_refused():
    """Label num_classes is the CFG null label (allowed); num_classes + 1 and up name the label."""
    model = dydit_lab.create_model("DiT-lab-T").eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        assert model(x, t, torch.tensor([3, 10])).shape == x.shape  # 10 = the null label
        for bad in (11, 12, -1):
            with pytest.raises(ValueError, match=f"class label {bad} is out of range"):
                model(x, t, torch.tensor([3, bad]))


def test_sampling_cost_of_a_dit_is_its_static_forward():
    from dydit_lab.models.flops import analytic_flops

    model = dydit_lab.create_model("DiT-lab-T")
    cost = model.sampling_cost(10)
    assert cost == {"gflops_per_step": analytic_flops(model.config)["total"] / 1e9, "flops_fraction": 1.0}


@pytest.mark.parametrize("shape", [(1, 16, 64), (3, 16, 64), (2, 5, 72)])
def test_layer_norm_equals_the_unweighted_one_bit_for_bit(shape):
    from dydit_lab.models.dit import LayerNorm
    norm, reference = LayerNorm(shape[-1]), torch.nn.LayerNorm(shape[-1], elementwise_affine=False, eps=1e-6)
    x = (torch.randn(shape) * 4 + 2).requires_grad_()
    grad_out = torch.randn(shape)
    out, expected = norm(x), reference(x)
    assert torch.equal(out, expected)
    assert torch.equal(torch.autograd.grad(out, x, grad_out)[0], torch.autograd.grad(expected, x, grad_out)[0])
    assert not dict(norm.state_dict())  # the weight of ones is not a parameter: official layout


@pytest.mark.parametrize("batch", [1, 3])
def test_modulated_norm_equals_norm_then_modulate(batch):
    from dydit_lab.models.dit import LayerNorm, modulate
    norm = LayerNorm(64)
    x, shift, scale = torch.randn(batch, 16, 64) * 3, torch.randn(batch, 64), torch.randn(batch, 64)
    assert torch.equal(norm.modulated(x, shift, scale), modulate(norm(x), shift, scale))
    rows = x[0, :5]  # rows of one sample (how a sliced DyDiT block passes its kept tokens)
    assert torch.equal(norm.modulated(rows, shift[:1], scale[:1]), modulate(norm(rows)[None], shift[:1], scale[:1])[0])


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_autocast_trains_through_the_norms(batch):
    # Under autocast the adaLN outputs are bf16 and the tokens fp32: the norms must not mix them.
    from dydit_lab.models.dydit import DyDiT
    model = DyDiT.from_dit(dydit_lab.create_model("DiT-S/4", input_size=16, num_classes=10)).train()
    x, t, y = torch.randn(batch, 4, 16, 16), torch.tensor([1, 500][:batch]), torch.tensor([0, 1][:batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and model.blocks[0].adaLN_modulation[1].weight.grad is not None
    # Eval: the sliced path (kept rows of one sample at batch 1) keeps the masked path's shapes.
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.execution = "masked"
        masked = model(x, t, y)
        model.execution = "sliced"
        sliced = model(x, t, y)
    assert sliced.shape == masked.shape == out.shape
    # The kept rows (M, C) of one sample with a bf16 shift and scale keep their shape.
    norm, rows = model.blocks[0].norm2, torch.randn(5, 384)
    shift, scale = torch.randn(1, 384, dtype=torch.bfloat16), torch.randn(1, 384, dtype=torch.bfloat16)
    assert torch.equal(norm.modulated(rows, shift, scale), torch.addcmul(shift[0], norm(rows), 1 + scale[0]))

"""DyDiT: official equivalence, masked vs sliced execution, conversion, routing record."""

from pathlib import Path

import pytest
import torch

import dydit_lab
from dydit_lab.dydit import DyDiT
from dydit_lab.models import DiTConfig

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG_KEYS = ("depth", "hidden_size", "patch_size", "num_heads", "input_size", "in_channels",
               "num_classes", "learn_sigma", "class_dropout_prob", "mlp_ratio")


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURES / "official_dydit_tiny.pt", weights_only=True)


def official_model(fx, execution):
    model = DyDiT(DiTConfig(**{k: fx["config"][k] for k in CONFIG_KEYS})).eval()
    model.load_state_dict(fx["state_dict"])
    model.execution = execution
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", ["same_t", "mixed_t"])
@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_matches_official_dydit(official, case, execution):
    """Outputs and masks equal the official DyDiT's for the same weights (eval mode)."""
    fx = official[case]
    model = official_model(official, execution)
    with torch.no_grad():
        out, routing = model(fx["x"], fx["t"], fx["y"], return_routing=True)
    assert rel_err(out, fx["out"]) < 1e-4
    assert torch.equal(routing.heads, fx["attn_mask"])
    assert torch.equal(routing.groups, fx["mlp_mask"])
    assert torch.equal(routing.tokens, fx["token_mask"].squeeze(-1))


def test_complete_model_matches_official(official):
    fx = official["mixed_t"]
    model = official_model(official, "sliced")
    with torch.no_grad():
        out, routing = model(fx["x"], fx["t"], fx["y"], complete_model=True, return_routing=True)
    assert routing is None and rel_err(out, official["complete_out"]) < 1e-4


def test_official_checkpoint_loads_as_dydit(official, tmp_path):
    torch.save({"ema": official["state_dict"], "args": {"model": "DiT-S/2"}}, tmp_path / "dydit.pt")
    # The tiny fixture is narrower than DiT-S/2: load_model reports that clearly...
    with pytest.raises(ValueError, match="shape mismatches"):
        dydit_lab.load_model(tmp_path / "dydit.pt")
    # ...and a DyDiT-S/2-shaped official state dict loads as a DyDiT.
    state = DyDiT(dydit_lab.models.get_config("DiT-S/8", input_size=16, num_classes=10)).state_dict()
    model = dydit_lab.load_model(state, arch="DiT-S/8")
    assert isinstance(model, DyDiT) and not model.training


def test_official_fraction_formula(official):
    """Our block FLOPs fraction and penalty equal the official loss's for the fixture masks
    (the official code uses fixed per-block constants of 256-token models)."""
    for case in ("same_t", "mixed_t"):
        fx = official[case]
        routing = dydit_lab.dydit.Routing(fx["attn_mask"], fx["mlp_mask"],
                                          fx["token_mask"].squeeze(-1), fx["t"])
        for record in fx["dynamic_loss"]:
            kw = record["kwargs"]
            cfg = dydit_lab.models.get_config(kw["model_name"], depth=kw["model_depth"])
            frac = routing.block_flops_fraction(cfg, tokens=256).mean()
            assert frac.item() == pytest.approx(record["flops_fraction"].item(), abs=1e-5)
            if kw["token_minimal_weight"] == 0:
                penalty = kw["token_loss_ratio"] * (frac - kw["token_target_ratio"]) ** 2
                assert penalty.item() == pytest.approx(record["loss"].item(), rel=1e-4)


def _random_dydit(arch="DiT-lab-T", seed=0, spread=2.0):
    torch.manual_seed(seed)
    model = DyDiT(dydit_lab.models.get_config(arch))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    for block in model.blocks:  # mixed gates: some units and tokens on, some off
        for r in (block.attn_rate.router, block.mlp_rate.router):
            r.weight.data.normal_(0, spread)
            r.bias.data.zero_()
        block.token_selection.mlp_head[2].bias.data.fill_(0.0)
    return model.eval()


@pytest.mark.parametrize("t", [[500, 500, 500, 500], [0, 999, 300, 999], [10, 10, 900, 900]])
def test_sliced_equals_masked(t):
    model = _random_dydit()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([1, 2, 3, 10])
    t = torch.tensor(t)
    with torch.no_grad():
        model.execution = "masked"
        masked, r_masked = model(x, t, y, return_routing=True)
        model.execution = "sliced"
        sliced, r_sliced = model(x, t, y, return_routing=True)
    assert torch.allclose(sliced, masked, atol=1e-5, rtol=1e-4)
    for a, b in zip((r_masked.heads, r_masked.groups, r_masked.tokens),
                    (r_sliced.heads, r_sliced.groups, r_sliced.tokens)):
        assert torch.equal(a, b)
    heads_on = r_sliced.heads.mean().item()
    assert 0.25 < heads_on < 1 and 0 < r_sliced.tokens.mean().item() < 1  # truly mixed


def test_slice_cache_follows_weight_updates():
    model = _random_dydit()
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([200, 200]), torch.tensor([1, 2])
    with torch.no_grad():
        before = model(x, t, y)
        model.blocks[0].attn.qkv.weight.mul_(1.5)  # in-place, as an optimizer step would
        after = model(x, t, y)
        model.execution = "masked"
        reference = model(x, t, y)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, reference, atol=1e-5, rtol=1e-4)


def test_conversion_reproduces_parent():
    parent = dydit_lab.create_model("DiT-lab-T")
    for p in parent.parameters():
        p.data.normal_(0, 0.2)
    parent.eval()
    child = DyDiT.from_dit(parent).eval()
    x, y = torch.randn(3, 1, 32, 32) * 5, torch.tensor([0, 5, 10])
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        out, routing = child(x, t, y, return_routing=True)
        assert torch.allclose(out, parent(x, t, y), atol=1e-5)
    assert routing.heads.all() and routing.groups.all() and routing.tokens.all()
    child.train()
    out, routing = child(x, t, y, return_routing=True)  # Gumbel noise cannot close a gate at init
    assert routing.heads.all() and routing.tokens.all()


def test_training_gates_have_gradients():
    model = _random_dydit()
    model.train()
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([100, 800]), torch.tensor([1, 2])
    out, routing = model(x, t, y, return_routing=True)
    routing.block_flops_fraction(model.config).mean().backward()
    router = model.blocks[0]
    assert router.attn_rate.router.weight.grad.abs().sum() > 0
    assert router.token_selection.mlp_head[0].weight.grad.abs().sum() > 0
    assert set(torch.unique(routing.heads.detach()).tolist()) <= {0.0, 1.0}


def test_execution_validation():
    model = _random_dydit()
    with pytest.raises(ValueError, match="execution"):
        model.execution = "fast"


def test_routing_macs_match_hand_count():
    from dydit_lab.flops import analytic_flops, dynamic_block_flops

    cfg = dydit_lab.models.get_config("DiT-lab-T")  # D=32, H=4, 16 tokens, depth 2
    heads = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]]], dtype=torch.float)
    groups = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]]], dtype=torch.float)
    tokens = torch.zeros(1, 2, 16)
    tokens[0, 0, :8] = 1
    tokens[0, 1, :4] = 1
    routing = dydit_lab.dydit.Routing(heads, groups, tokens, torch.tensor([5]))
    static = analytic_flops(cfg)
    D, N, hd, G = 32, 16, 8, 32
    block = lambda h, g, k: (N * D * 3 * h * hd + 2 * N * N * h * hd + N * h * hd * D  # noqa: E731
                             + 2 * k * D * g * G)
    full = block(4, 4, 16)
    expected = static["total"] - 2 * full + block(2, 3, 8) + block(1, 2, 4)
    assert routing.macs(cfg, include_routers=False).item() == expected
    routers = dynamic_block_flops(cfg, N, 1, 1, 1)
    with_routers = expected + 2 * (routers["sdt_router"] + routers["tdw_router"])
    assert routing.macs(cfg).item() == with_routers

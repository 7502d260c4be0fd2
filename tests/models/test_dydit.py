"""DyDiT: official equivalence, masked vs sliced execution, conversion, routing record."""

import pytest
import torch

import dydit_lab
from dydit_lab.models.configs import DiTConfig, get_config
from dydit_lab.models.dydit import CompleteModel, DyDiT
from tests.helpers import random_dydit

CONFIG_KEYS = ("depth", "hidden_size", "patch_size", "num_heads", "input_size", "in_channels",
               "num_classes", "learn_sigma", "class_dropout_prob", "mlp_ratio")


def official_model(fx, execution):
    model = DyDiT(DiTConfig(**{k: fx["config"][k] for k in CONFIG_KEYS})).eval()
    model.load_state_dict(fx["state_dict"])
    model.execution = execution
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", ["same_t", "mixed_t"])
@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_matches_official_dydit(official_dydit, case, execution):
    """Outputs and masks equal the official DyDiT's for the same weights (eval mode)."""
    fx = official_dydit[case]
    model = official_model(official_dydit, execution)
    with torch.no_grad():
        out, routing = model(fx["x"], fx["t"], fx["y"], return_routing=True)
    assert rel_err(out, fx["out"]) < 1e-4
    assert torch.equal(routing.heads, fx["attn_mask"])
    assert torch.equal(routing.groups, fx["mlp_mask"])
    assert torch.equal(routing.tokens, fx["token_mask"].squeeze(-1))


def test_complete_model_matches_official(official_dydit):
    fx = official_dydit["mixed_t"]
    model = official_model(official_dydit, "sliced")
    with torch.no_grad():
        out, routing = model(fx["x"], fx["t"], fx["y"], complete_model=True, return_routing=True)
    assert routing is None and rel_err(out, official_dydit["complete_out"]) < 1e-4


def test_official_checkpoint_loads_as_dydit(official_dydit, tmp_path):
    torch.save({"ema": official_dydit["state_dict"], "args": {"model": "DiT-S/2"}}, tmp_path / "dydit.pt")
    # The tiny fixture is narrower than DiT-S/2: load_model reports that clearly...
    with pytest.raises(ValueError, match="shape mismatches"):
        dydit_lab.load_model(tmp_path / "dydit.pt")
    # ...and a DyDiT-S/2-shaped official state dict loads as a DyDiT.
    state = DyDiT(get_config("DiT-S/8", input_size=16, num_classes=10)).state_dict()
    model = dydit_lab.load_model(state, arch="DiT-S/8")
    assert isinstance(model, DyDiT) and not model.training




@pytest.mark.parametrize("t", [[500, 500, 500, 500], [0, 999, 300, 999], [10, 10, 900, 900]])
def test_sliced_equals_masked(t):
    model = random_dydit()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([1, 2, 3, 10])
    t = torch.tensor(t)
    with torch.no_grad():
        model.execution = "masked"
        masked, r_masked = model(x, t, y, return_routing=True)
        model.execution = "sliced"
        sliced, r_sliced = model(x, t, y, return_routing=True)
    assert torch.allclose(sliced, masked, atol=1e-5, rtol=1e-4) and rel_err(sliced, masked) < 1e-5
    for a, b in zip((r_masked.heads, r_masked.groups, r_masked.tokens),
                    (r_sliced.heads, r_sliced.groups, r_sliced.tokens)):
        assert torch.equal(a, b)
    heads_on = r_sliced.heads.mean().item()
    assert 0.25 < heads_on < 1 and 0 < r_sliced.tokens.mean().item() < 1  # truly mixed


def test_slice_cache_follows_weight_updates():
    model = random_dydit()
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
    model = random_dydit()
    model.train()
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([100, 800]), torch.tensor([1, 2])
    out, routing = model(x, t, y, return_routing=True)
    routing.block_flops_fraction(model.config).mean().backward()
    router = model.blocks[0]
    assert router.attn_rate.router.weight.grad.abs().sum() > 0
    assert router.token_selection.mlp_head[0].weight.grad.abs().sum() > 0
    assert set(torch.unique(routing.heads.detach()).tolist()) <= {0.0, 1.0}


def test_execution_validation():
    model = random_dydit()
    with pytest.raises(ValueError, match="execution"):
        model.execution = "fast"


def test_noiseless_training_gates_route_as_in_eval():
    dydit = DyDiT.from_dit(dydit_lab.create_model("DiT-lab-T"), sdt_bias=0.3)
    for block in dydit.blocks:
        block.attn_rate.router.bias.data = torch.tensor([0.2, -0.2, 0.1])
    x, t, y = torch.randn(8, 1, 32, 32), torch.randint(1000, (8,)), torch.randint(10, (8,))
    dydit.eval()
    _, eval_routing = dydit(x, t, y, return_routing=True)
    dydit.train()
    dydit.set_gumbel_noise(0.0)
    _, train_routing = dydit(x, t, y, return_routing=True)
    assert torch.equal(train_routing.heads, eval_routing.heads)
    assert torch.equal(train_routing.tokens, eval_routing.tokens)
    dydit.set_gumbel_noise(1.0)  # logits this close to 0: the noise flips some gates
    noisy = [dydit(x, t, y, return_routing=True)[1].heads for _ in range(5)]
    assert any(not torch.equal(h, eval_routing.heads) for h in noisy)
    with pytest.raises(ValueError, match="noise scale"):
        dydit.set_gumbel_noise(2.0)


def test_complete_model_from_t_routes_only_below_it():
    torch.manual_seed(0)
    dit = dydit_lab.create_model("DiT-lab-T")
    for p in dit.parameters():  # past adaLN-Zero's zero output
        p.data.normal_(0, 0.05)
    dydit = DyDiT.from_dit(dit).eval()
    for block in dydit.blocks:  # the routers close heads 2-3 at every t
        block.attn_rate.router.bias.data = torch.tensor([15.0, -15.0, -15.0])
    x, y = torch.randn(4, 1, 32, 32), torch.arange(4)
    t = torch.tensor([100, 900, 100, 900])
    hybrid = CompleteModel(dydit, from_t=500)(x, t, y)
    high, low = t >= 500, t < 500
    assert torch.allclose(hybrid[high], dydit(x[high], t[high], y[high], complete_model=True), atol=1e-6)
    assert torch.allclose(hybrid[low], dydit(x[low], t[low], y[low]), atol=1e-6)
    assert not torch.allclose(hybrid[low], dydit(x[low], t[low], y[low], complete_model=True), atol=1e-4)
    routed = dydit.sampling_cost(4)["flops_fraction"]
    partial = CompleteModel(dydit, from_t=500).sampling_cost(4)["flops_fraction"]
    # DDIM-4 visits t = 999, 749 (complete) and 500, 250 ... the two routed steps keep their cost.
    assert routed < partial < 1.0
    assert CompleteModel(dydit).sampling_cost(4)["flops_fraction"] == 1.0  # all on: the static DiT
    with pytest.raises(ValueError, match="from_t"):
        CompleteModel(dydit, from_t=1000)
    with pytest.raises(TypeError, match="DyDiT"):
        CompleteModel(dit)


def test_complete_model_samples_with_guidance():
    """Guidance wraps any model: a CompleteModel (no forward_with_cfg of its own) samples with
    cfg_scale != 1, its null label the DyDiT's."""
    from dydit_lab.diffusion import GaussianDiffusion

    dydit = random_dydit()
    complete = CompleteModel(dydit)
    d = GaussianDiffusion().respaced(3)
    y = torch.tensor([1, 2])
    with torch.no_grad():
        out = d.sample(complete, y, (2, 1, 32, 32), cfg_scale=2.0, method="ddim", progress=False)
        ref = d.sample(lambda x, t, y: dydit(x, t, y, complete_model=True), y, (2, 1, 32, 32),
                       cfg_scale=2.0, null_label=dydit.num_classes, method="ddim", progress=False)
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_routing_recorder_records_every_call():
    from dydit_lab.models.dydit import RoutingRecorder

    dydit = random_dydit()
    recorder = RoutingRecorder(dydit)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([5, 5]), torch.tensor([1, 2])
    with torch.no_grad():
        out = recorder(x, t, y)
        recorder(x, t + 500, y)
        assert torch.equal(out, dydit(x, t, y))
    assert len(recorder.records) == 2 and recorder.records[1].t.tolist() == [505, 505]
    assert recorder.records[0].heads.shape == (2, 2, 4) and not recorder.records[0].heads.requires_grad
    with pytest.raises(TypeError):
        RoutingRecorder(dydit_lab.create_model("DiT-lab-T"))

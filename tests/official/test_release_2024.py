"""The December 2024 DyDiT release (NUS-HPC-AI-Lab, ``dydit_0.7.pth``): ``DiffRate`` width routers
``Linear(D, H)`` with a gate per head / MLP group and no always-on unit.

The reference below re-implements that release's eval forward in a few lines from its published
semantics (routers read the timestep embedding, gate = sigmoid(logit) > 0.5, head gates scale
each head's output before ``proj``, group gates scale ``fc1``'s output before GELU-tanh, token
gates read the residual stream after the attention add and scale the whole MLP branch), on the
raw weights of a checkpoint written in that layout.
"""

import pytest
import torch
import torch.nn.functional as F

from dydit_lab.checkpoints import CheckpointError, load_model, router_release, save_training_checkpoint
from dydit_lab.models import DyDiT, create_model, get_config
from dydit_lab.models.dydit import sampling_flops
from dydit_lab.models.routers import set_router_release
from dydit_lab.training.loop import LoopConfig

ARCH = "DiT-S/8"


def width_routers(model):
    return [r for b in model.blocks for r in (b.attn_rate, b.mlp_rate)]


def release_2024_state(seed: int = 0, input_size: int = 32) -> dict:
    """A 2024-layout DyDiT-S/8 state dict with random weights and mixed routing; block 1 has
    every head off, block 2 every MLP group off (possible only in this release)."""
    torch.manual_seed(seed)
    model = DyDiT(get_config(ARCH, input_size=input_size, num_classes=10))
    set_router_release(width_routers(model), "2024")
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.data.normal_(0, 0.05)
    for block in model.blocks:
        for r in (block.attn_rate.router, block.mlp_rate.router):
            r.weight.data.normal_(0, 2.0)
            r.bias.data.zero_()
        block.token_selection.mlp_head[2].bias.data.zero_()
    model.blocks[1].attn_rate.router.bias.data.fill_(-100.0)
    model.blocks[2].mlp_rate.router.bias.data.fill_(-100.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def reference_forward(state, model, x, t, y):
    """The 2024 release's eval forward on raw weights (embedders and final layer: ours, pinned
    against the official DiT elsewhere). Returns (out, head masks, group masks, token masks)."""
    tokens = model.x_embedder(x) + state["pos_embed"]
    t_emb = model.t_embedder(t)
    c = t_emb + model.y_embedder(y, False)
    B, N, D = tokens.shape
    H = model.num_heads
    hd = D // H
    on = lambda logits: (torch.sigmoid(logits) > 0.5).float()  # noqa: E731
    masks = ([], [], [])
    for i in range(len(model.blocks)):
        w = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        lin = lambda v, name: F.linear(v, w(name + ".weight"), w(name + ".bias"))  # noqa: E731
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), "adaLN_modulation.1").chunk(6, dim=1)
        heads, groups = on(lin(t_emb, "attn_rate.router")), on(lin(t_emb, "mlp_rate.router"))
        h = F.layer_norm(tokens, (D,), eps=1e-6) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = lin(h, "attn.qkv").reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(B, N, D) * heads.repeat_interleave(hd, 1)[:, None]
        tokens = tokens + gate1[:, None] * lin(attn, "attn.proj")
        keep = on(lin(F.relu(lin(tokens, "token_selection.mlp_head.0")), "token_selection.mlp_head.2"))
        h = F.layer_norm(tokens, (D,), eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None]
        hidden = lin(h, "mlp.fc1")
        hidden = hidden * groups.repeat_interleave(hidden.shape[-1] // H, 1)[:, None]
        tokens = tokens + keep * (gate2[:, None] * lin(F.gelu(hidden, approximate="tanh"), "mlp.fc2"))
        for record, value in zip(masks, (heads, groups, keep.squeeze(-1))):
            record.append(value)
    out = model.unpatchify(model.final_layer(tokens, c))
    return (out, *(torch.stack(m, dim=1) for m in masks))


@pytest.fixture(scope="module")
def release_2024_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "dydit_0.7.pth"
    torch.save(release_2024_state(), path)  # the release is a raw state dict
    return path


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_release_2024_matches_its_reference(release_2024_file, execution):
    model = load_model(release_2024_file, arch=ARCH)
    assert isinstance(model, DyDiT)
    assert not any(r.always_on_first for r in width_routers(model))
    state = torch.load(release_2024_file, weights_only=True)
    x = torch.randn(4, 4, 32, 32)
    t, y = torch.tensor([999, 600, 250, 3]), torch.tensor([0, 3, 7, 10])  # 10: the CFG null label
    model.execution = execution
    with torch.no_grad():
        out, routing = model(x, t, y, return_routing=True)
        ref, heads, groups, keep = reference_forward(state, model, x, t, y)
    assert out.shape == (4, 8, 32, 32)
    assert rel_err(out, ref) < 1e-4
    assert torch.equal(routing.heads, heads) and torch.equal(routing.groups, groups)
    assert torch.equal(routing.tokens, keep)
    # the unit that the 2025 release keeps on is off in blocks that run others, and whole blocks switch off
    assert ((heads[..., 0] == 0) & (heads.sum(-1) > 0)).any()
    assert not heads[:, 1].any() and not groups[:, 2].any()
    assert 0 < keep.mean() < 1


def test_sliced_blocks_with_nothing_on_equal_the_masked_path(release_2024_file):
    model = load_model(release_2024_file, arch=ARCH)
    for block in model.blocks:  # every head and group off in every block, at every t
        for r in (block.attn_rate, block.mlp_rate):
            r.router.bias.data.fill_(-100.0)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([500, 20]), torch.tensor([1, 2])
    with torch.no_grad():
        model.execution = "masked"
        masked = model(x, t, y)
        model.execution = "sliced"
        sliced, routing = model(x, t, y, return_routing=True)
    assert not routing.heads.any() and not routing.groups.any()
    assert rel_err(sliced, masked) < 1e-5
    assert routing.flops_fraction(model.config).max() < 0.5


def test_release_detection_and_bad_router_shapes():
    state = release_2024_state(input_size=16)
    assert router_release(state, 6) == "2024"
    as_2025 = {k: (v[1:] if k.endswith(("attn_rate.router.weight", "attn_rate.router.bias",
                                        "mlp_rate.router.weight", "mlp_rate.router.bias")) else v)
               for k, v in state.items()}
    assert router_release(as_2025, 6) == "2025"
    assert all(r.always_on_first for r in width_routers(load_model(as_2025, arch=ARCH)))

    bad = dict(state)
    bad["blocks.3.mlp_rate.router.weight"] = torch.zeros(4, 384)
    with pytest.raises(CheckpointError) as err:
        load_model(bad, arch=ARCH)
    text = str(err.value)
    assert "blocks.3.mlp_rate.router.weight" in text and "(4, 384)" in text
    assert "(5, D)" in text and "(6, D)" in text

    mixed = dict(state)
    mixed["blocks.0.attn_rate.router.weight"] = as_2025["blocks.0.attn_rate.router.weight"]
    mixed["blocks.0.attn_rate.router.bias"] = as_2025["blocks.0.attn_rate.router.bias"]
    with pytest.raises(CheckpointError, match="both DyDiT releases"):
        load_model(mixed, arch=ARCH)


def test_release_2024_trains_samples_and_round_trips(tmp_path):
    model = load_model(release_2024_state(input_size=16), arch=ARCH).train()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([900, 100]), torch.tensor([1, 2])
    out, routing = model(x, t, y, return_routing=True)
    assert routing.heads.shape == (2, 12, 6)
    routing.block_flops_fraction(model.config).mean().backward()
    assert model.blocks[0].attn_rate.router.weight.grad.abs().sum() > 0

    opt = torch.optim.AdamW(model.parameters())
    save_training_checkpoint(tmp_path / "ck.pt", model, model, opt, LoopConfig(), step=1)
    again = load_model(tmp_path / "ck.pt")
    assert not any(r.always_on_first for r in width_routers(again))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    cost = sampling_flops(again, steps=3, num_samples=2, progress=False)
    assert 0 < cost["flops_fraction"] < 1


def test_new_dydits_keep_the_2025_layout():
    model = DyDiT.from_dit(create_model("DiT-lab-T"))
    assert all(r.always_on_first and r.router.out_features == 3 for r in width_routers(model))
    with pytest.raises(ValueError, match="unknown DyDiT release"):
        set_router_release(width_routers(model), "2023")


@pytest.mark.cuda
def test_release_2024_sliced_equals_masked_on_cuda(release_2024_file):
    model = load_model(release_2024_file, arch=ARCH, device="cuda")
    model.blocks[3].attn_rate.router.bias.data.fill_(-100.0)  # blocks with nothing on take the bias-only path
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t, y = torch.tensor([999, 600, 250, 3], device="cuda"), torch.tensor([0, 3, 7, 10], device="cuda")
    with torch.no_grad():
        model.execution = "masked"
        masked, r_masked = model(x, t, y, return_routing=True)
        model.execution = "sliced"
        sliced, r_sliced = model(x, t, y, return_routing=True)
    assert rel_err(sliced, masked) < 1e-4 and torch.equal(r_sliced.heads, r_masked.heads)
    assert not r_sliced.heads[:, 3].any()

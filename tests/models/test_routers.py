"""DyDiT's routers: hard gates with straight-through gradients, all-on initialisation, and the
routing record's FLOPs (block fraction as the official loss, exact MACs by hand count)."""

import pytest
import torch

from dydit_lab.models.flops import analytic_flops, dynamic_block_flops
from dydit_lab.models.configs import get_config
from dydit_lab.models.routers import (Routing, TokenRouter, WidthRouter, gate,
                                      init_routers_all_on)


def test_official_fraction_formula(official_dydit):
    """Our block FLOPs fraction and penalty equal the official loss's for the fixture masks
    (the official code uses fixed per-block constants of 256-token models)."""
    for case in ("same_t", "mixed_t"):
        fx = official_dydit[case]
        routing = Routing(fx["attn_mask"], fx["mlp_mask"], fx["token_mask"].squeeze(-1), fx["t"])
        for record in fx["dynamic_loss"]:
            kw = record["kwargs"]
            cfg = get_config(kw["model_name"], depth=kw["model_depth"])
            frac = routing.block_flops_fraction(cfg, tokens=256).mean()
            assert frac.item() == pytest.approx(record["flops_fraction"].item(), abs=1e-5)
            if kw["token_minimal_weight"] == 0:
                penalty = kw["token_loss_ratio"] * (frac - kw["token_target_ratio"]) ** 2
                assert penalty.item() == pytest.approx(record["loss"].item(), rel=1e-4)


def test_routing_macs_match_hand_count():
    cfg = get_config("DiT-lab-T")  # D=32, H=4, 16 tokens, depth 2
    heads = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]]], dtype=torch.float)
    groups = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]]], dtype=torch.float)
    tokens = torch.zeros(1, 2, 16)
    tokens[0, 0, :8] = 1
    tokens[0, 1, :4] = 1
    routing = Routing(heads, groups, tokens, torch.tensor([5]))
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


def test_gates_are_hard_with_the_soft_gradient():
    logits = torch.tensor([-3.0, -0.1, 0.2, 4.0], requires_grad=True)
    gates = gate(logits, training=False)
    assert gates.tolist() == [0.0, 0.0, 1.0, 1.0]
    gates.sum().backward()
    soft = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, soft * (1 - soft))  # straight-through: d sigmoid / d logit


def test_routers_start_all_on_and_refuse_closed_biases():
    width, tokens = WidthRouter(32, 4), TokenRouter(32)
    init_routers_all_on([width], [tokens], tdw_bias=15.0, sdt_bias=15.0)
    width.train()
    tokens.train()
    t_emb, x = torch.randn(64, 32) * 100, torch.randn(2, 16, 32) * 100
    assert width(t_emb).shape == (64, 4) and width(t_emb).all()  # unit 0 always, the rest by bias
    assert tokens(x).shape == (2, 16) and tokens(x).all()
    with pytest.raises(ValueError, match="positive"):
        init_routers_all_on([width], [tokens], tdw_bias=0.0)

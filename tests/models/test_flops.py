"""FLOPs (MACs): published DiT figures, analytic == fvcore on every preset, DyDiT accounting,
FlexiDiT schedules."""

import functools

import pytest
import torch

from dydit_lab.evaluation.report import count_flops_report
from dydit_lab.models.flops import (
    analytic_flops,
    block_flops,
    dydit_flops_bounds,
    dynamic_block_flops,
    dynamic_flops_fraction,
    dynamic_model_flops,
    fvcore_flops,
    schedule_flops,
)
from dydit_lab.models import DIT_CONFIGS, DiTConfig, create_model, get_config
from tests.helpers import lab_t_macs

# Published static GFLOPs at 256 px (latent 32x32), one sample (DiT paper, DyDiT paper).
PUBLISHED_GFLOPS = {"DiT-S/2": 6.07, "DiT-B/2": 23.02, "DiT-L/2": 80.75, "DiT-XL/2": 118.69, "DiT-XL/8": 7.40}
# Per-block attention / MLP GFLOPs at 256 tokens (DyDiT paper's accounting).
PUBLISHED_BLOCK_GFLOPS = {
    "DiT-S/2": (0.2013, 0.3020), "DiT-B/2": (0.7046, 1.2080), "DiT-XL/2": (1.5099, 2.7179),
}
# A tiny config for hand counts: D=32, H=4 (head_dim 8), MLP hidden 128 (4 groups of 32), 16 tokens.
TINY = DiTConfig(depth=2, hidden_size=32, patch_size=2, num_heads=4, input_size=8,
                 in_channels=1, num_classes=10, learn_sigma=False)


@functools.lru_cache(maxsize=None)
def report(arch):
    """One fvcore trace per preset for the whole module (DiT-XL/2 takes a few seconds)."""
    return count_flops_report(arch)


@pytest.mark.parametrize("arch", list(PUBLISHED_GFLOPS))
def test_analytic_reproduces_published_figures(arch):
    gflops = analytic_flops(arch)["total"] / 1e9
    assert abs(gflops - PUBLISHED_GFLOPS[arch]) / PUBLISHED_GFLOPS[arch] < 1e-3


def test_analytic_parts_of_dit_xl2():
    parts = analytic_flops(get_config("DiT-XL/2"))
    assert parts["attn_matmul"] == 28 * 2 * 256 * 256 * 1152  # q@k^T and attn@v, all blocks
    assert parts["norm"] == (2 * 28 + 1) * 256 * 1152 * 4  # fvcore: 4 per element, no affine
    assert parts["x_embedder"] == 256 * 1152 * 4 * 2 * 2
    assert parts["t_embedder"] == 256 * 1152 + 1152 * 1152
    assert parts["y_embedder"] == 0
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_analytic_accepts_config_model_or_name():
    model = create_model("DiT-lab-T")
    assert analytic_flops(model) == analytic_flops("DiT-lab-T") == analytic_flops(get_config("DiT-lab-T"))
    with pytest.raises(TypeError):
        analytic_flops(42)


@pytest.mark.parametrize("arch", list(DIT_CONFIGS))
def test_fvcore_agrees_with_analytic_on_every_preset(arch):
    r = report(arch)
    parts = analytic_flops(arch)
    assert r["gflops_fvcore"] * 1e9 == r["macs"] == parts["total"]  # to the last MAC
    assert r["gflops_fvcore_naive"] * 1e9 == pytest.approx(parts["total"] - parts["attn_matmul"], abs=1)


def test_report_of_dit_xl2():
    r = report("DiT-XL/2")
    assert round(r["gflops"], 2) == 118.69
    assert round(r["gflops_fvcore_naive"], 2) == 114.46  # stock fvcore misses the SDPA matmuls
    assert round(r["params_m"], 2) == 675.13
    assert r["tokens"] == 256 and r["input_size"] == 32
    parts = sum(v for k, v in r.items() if k.startswith("gflops_") and "fvcore" not in k)
    assert parts == pytest.approx(r["gflops"], rel=1e-12)


@pytest.mark.parametrize("arch", ["DiT-S/2", "DiT-lab-S", "DiT-lab-L", "DiT-lab-T"])
def test_fvcore_flops_on_initialised_model(arch):
    model = create_model(arch).train()
    parts = analytic_flops(model)
    assert fvcore_flops(model) == parts["total"]
    assert fvcore_flops(model, count_sdpa=False) == parts["total"] - parts["attn_matmul"]
    assert model.training  # the mode is restored after the eval-mode trace


def test_fvcore_flops_batch_and_input_size():
    model = create_model("DiT-lab-T")
    assert fvcore_flops(model, input_size=32, batch_size=2) == 2 * analytic_flops(model)["total"]
    with pytest.raises(ValueError, match="not 16"):
        fvcore_flops(model, input_size=16)


@pytest.mark.parametrize("arch", list(PUBLISHED_BLOCK_GFLOPS))
def test_block_flops_match_dydit_paper(arch):
    parts = block_flops(get_config(arch), tokens=256)
    assert set(parts) == {"attn", "mlp"}
    attn, mlp = PUBLISHED_BLOCK_GFLOPS[arch]
    assert round(parts["attn"] / 1e9, 4) == attn
    assert round(parts["mlp"] / 1e9, 4) == mlp


def test_dynamic_block_flops_hand_count():
    parts = dynamic_block_flops(TINY, tokens=16, active_heads=3, active_groups=2, kept_tokens=10)
    qkv = 16 * 32 * 3 * (3 * 8)  # tokens * D * 3 * (h * head_dim)
    matmuls = 2 * 16 * 16 * (3 * 8)  # q@k^T and attn@v over the 3 active heads
    proj = 16 * (3 * 8) * 32
    assert parts["attn"] == qkv + matmuls + proj == 61440
    assert parts["mlp"] == 10 * 32 * (2 * 32) * 2 == 40960  # kept * D * (g * 128/4), fc1 + fc2
    assert parts["sdt_router"] == 16 * (32 * 2 + 2 * 1) == 1056  # D -> D/16 = 2 -> 1, all tokens
    assert parts["tdw_router"] == 2 * 32 * (4 - 1) == 192  # two Linear(D, H - 1) per sample


def test_dynamic_block_at_full_and_zero_width():
    full = dynamic_block_flops(TINY, 16, active_heads=4, active_groups=4, kept_tokens=16)
    assert {k: full[k] for k in ("attn", "mlp")} == block_flops(TINY, 16)
    xl = get_config("DiT-XL/2")
    assert {k: v for k, v in dynamic_block_flops(xl, 256, 16, 16, 256).items() if k in ("attn", "mlp")} \
        == block_flops(xl, 256)
    none = dynamic_block_flops(TINY, 16, active_heads=0, active_groups=0, kept_tokens=0)
    assert none["attn"] == none["mlp"] == 0


@pytest.mark.parametrize("kwargs", [
    {"active_heads": 5, "active_groups": 1, "kept_tokens": 1},
    {"active_heads": 1, "active_groups": -1, "kept_tokens": 1},
    {"active_heads": 1, "active_groups": 1, "kept_tokens": 17},
])
def test_dynamic_block_rejects_impossible_records(kwargs):
    with pytest.raises(ValueError):
        dynamic_block_flops(TINY, 16, **kwargs)


def test_dynamic_model_flops_and_fraction():
    static = analytic_flops(TINY)["total"]
    full = [(4, 4, 16)] * TINY.depth
    assert dynamic_model_flops(TINY, full, include_routers=False) == static
    assert dynamic_flops_fraction(TINY, full, include_routers=False) == 1.0
    # Block 0 runs 3 heads, 2 groups on 10 tokens (hand count above); block 1 is full.
    routing = [{"active_heads": 3, "active_groups": 2, "kept_tokens": 10}, (4, 4, 16)]
    saved = sum(block_flops(TINY, 16).values()) - (61440 + 40960)
    assert dynamic_model_flops(TINY, routing, include_routers=False) == static - saved
    routers = 2 * (1056 + 192)
    assert dynamic_model_flops(TINY, routing) == static - saved + routers
    assert dynamic_flops_fraction(TINY, routing) == pytest.approx((static - saved + routers) / static)
    with pytest.raises(ValueError, match="2 routing records"):
        dynamic_model_flops(TINY, full[:1])




def test_report_rejects_non_positive_input_size():
    with pytest.raises(ValueError, match="positive"):
        count_flops_report("DiT-S/2", input_size=0)


def test_report_at_other_input_size():
    r = count_flops_report("DiT-lab-T", input_size=16)
    assert r["tokens"] == 4 and r["macs"] == analytic_flops(get_config("DiT-lab-T", input_size=16))["total"]
    assert torch.get_default_device().type == "cpu"  # the meta-device build leaves no trace


def test_schedule_flops_hand_count():
    native, coarse = lab_t_macs(16, 8), lab_t_macs(4, 16)
    report = schedule_flops("DiT-lab-T", 16, 3, 10)
    assert report["native_macs"] == native and report["coarse_macs"] == coarse
    assert report["total_macs"] == 3 * coarse + 7 * native
    assert report["gflops_per_image_step"] == pytest.approx((3 * coarse + 7 * native) / 10 / 1e9)
    assert report["flops_fraction"] == pytest.approx((3 * coarse + 7 * native) / (10 * native))
    assert schedule_flops("DiT-lab-T", None, 0, 10)["flops_fraction"] == 1.0
    assert schedule_flops("DiT-lab-T", None, 10, 10)["flops_fraction"] == pytest.approx(coarse / native)
    with pytest.raises(ValueError):
        schedule_flops("DiT-lab-T", 16, 11, 10)


def test_dydit_flops_bounds_by_hand():
    cfg = get_config("DiT-lab-T")  # 16 tokens, 4 heads
    total = analytic_flops(cfg)["total"]
    floor, full = dydit_flops_bounds(cfg)
    assert floor == dynamic_model_flops(cfg, [(1, 1, 0)] * 2) / total
    assert full == dynamic_model_flops(cfg, [(4, 4, 16)] * 2) / total
    routers = 2 * sum(v for k, v in dynamic_block_flops(cfg, 16, 4, 4, 16).items() if k.endswith("router"))
    assert full == pytest.approx(1 + routers / total) and 0 < floor < 0.5

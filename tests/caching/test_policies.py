"""Caching policies on DiT-lab-T and a random DyDiT: reuse-free settings are the plain sampler,
FLOPs are counted from what ran (hand counts), a DyDiT keeps skipping under a cache."""

import pytest
import torch

import dydit_lab
from dydit_lab.caching import (FORA, CachedModel, FirstBlockCache, LearningToCache, TeaCache, ToCa,
                               cached_model)
from dydit_lab.diffusion import GaussianDiffusion
from tests.helpers import lab_t_macs, randomised, random_dydit

D, N, HIDDEN = 32, 16, 128  # DiT-lab-T: width, tokens (patch 8 on 32x32), MLP hidden
TOTAL = lab_t_macs(N, 8)
BLOCK = (6 * D * D + 2 * N * D * 4  # adaLN, two LayerNorms
         + N * D * 3 * D + 2 * N * N * D + N * D * D  # attention
         + 2 * N * D * HIDDEN)  # MLP
OUTSIDE = TOTAL - 2 * BLOCK  # embedders, final layer, unpatchify: paid by every call


def tiny_dit():
    torch.manual_seed(0)
    return randomised(dydit_lab.create_model("DiT-lab-T"))


def sample(model, steps=6, n=4, cfg_scale=1.0):
    with torch.no_grad():
        return GaussianDiffusion().respaced(steps).sample(model, torch.arange(n) % 10, (n, 1, 32, 32),
                                                           method="ddim", seed=0, cfg_scale=cfg_scale, progress=False)


def reuse_free_router(steps=6):
    return {"logits": torch.zeros(steps, 2), "arch": "DiT-lab-T"}  # threshold 0: every weight 0.5 > 0


REUSE_FREE = {
    "FORA interval 1": lambda: FORA(1),
    "FBCache threshold 0": lambda: FirstBlockCache(0.0),
    "DBCache threshold 0": lambda: FirstBlockCache(0.0, first=1, last=1),
    "TeaCache threshold 0": lambda: TeaCache(0.0, [1.0, 0.0]),
    "ToCa interval 1": lambda: ToCa(0.25, interval=1),
    "L2C threshold 0": lambda: LearningToCache(reuse_free_router(), 0.0),
}


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("name", sorted(REUSE_FREE))
def test_reuse_free_settings_are_the_plain_sampler(name, cfg_scale):
    dit = tiny_dit()
    cached = CachedModel(dit, REUSE_FREE[name]())
    assert torch.equal(sample(cached, cfg_scale=cfg_scale), sample(dit, cfg_scale=cfg_scale))
    assert all(all(r.computed) for r in cached.records) and len(cached.records) == 6


@pytest.mark.parametrize("name", sorted(REUSE_FREE))
def test_reuse_free_settings_on_a_dydit_are_its_plain_sampler(name):
    dydit = random_dydit()
    cached = CachedModel(dydit, REUSE_FREE[name]())
    assert torch.equal(sample(cached), sample(dydit))
    # The same routing, so the same cost as the DyDiT's own count of a sampling run.
    assert cached.sampling_cost(6)["flops_fraction"] == pytest.approx(dydit.sampling_cost(6)["flops_fraction"],
                                                                      rel=1e-6)


def test_reuse_changes_the_samples_a_little():
    dit = tiny_dit()
    plain = sample(dit)
    for policy in (FORA(2), TeaCache(10.0), FirstBlockCache(10.0), ToCa(0.25, 2)):
        out = sample(CachedModel(dit, policy))
        assert not torch.equal(out, plain) and ((out - plain).norm() / plain.norm()) < 0.1, policy


def test_fora_cost_is_the_hand_count():
    """Interval 2 over 4 steps: steps 0 and 2 run both blocks, 1 and 3 reuse them (free)."""
    cached = CachedModel(tiny_dit(), FORA(2))
    run = cached.sampling_run(4, num_samples=3)
    assert [r.macs for r in run["records"]] == [TOTAL, OUTSIDE, TOTAL, OUTSIDE]
    assert run["per_step_blocks"] == [2, 0, 2, 0]
    assert run["gflops_per_step"] * 1e9 == pytest.approx(OUTSIDE + BLOCK, rel=1e-12)  # half the blocks
    assert run["flops_fraction"] == pytest.approx((OUTSIDE + BLOCK) / TOTAL, rel=1e-12)
    assert run["block_flops_fraction"] == 0.5 and run["blocks_computed"] == 0.5
    assert set(cached.sampling_cost(4)) >= {"gflops_per_step", "flops_fraction"}


def test_teacache_and_fbcache_charge_their_probes():
    probe = 6 * D * D + N * D * 4  # block 0's adaLN + norm1 on every token
    run = CachedModel(tiny_dit(), TeaCache(1e9)).sampling_run(5, num_samples=2)  # reuse whenever allowed
    assert [sum(r.computed) for r in run["records"]] == [2, 0, 0, 0, 2]  # first and last steps run
    assert [r.macs for r in run["records"]] == [TOTAL + probe] + [OUTSIDE + probe] * 3 + [TOTAL + probe]
    run = CachedModel(tiny_dit(), FirstBlockCache(1e9)).sampling_run(4, num_samples=2)
    # Block 0 is the probe and always runs; block 1 runs at the first step only.
    assert [r.computed for r in run["records"]] == [[True, True]] + [[True, False]] * 3
    assert [r.macs for r in run["records"]] == [TOTAL] + [OUTSIDE + BLOCK] * 3


def test_toca_cost_is_the_hand_count():
    """Full steps every 2; in between each block pays adaLN, then norm2 + MLP on its fresh tokens."""
    fresh = int(0.3 * N)
    run = CachedModel(tiny_dit(), ToCa(0.3, interval=2)).sampling_run(4, num_samples=2)
    partial = OUTSIDE + 2 * (6 * D * D + fresh * (4 * D + 2 * D * HIDDEN))
    assert [r.macs for r in run["records"]] == [TOTAL, partial, TOTAL, partial]
    assert [r.tokens for r in run["records"]] == [[N, N], [fresh, fresh]] * 2


def test_a_cached_dydit_still_skips_and_costs_less_than_the_cached_dit():
    dydit = random_dydit()
    cached = CachedModel(dydit, FORA(2))
    sample(cached)
    computed = [r for r in cached.records if all(r.computed)]
    reused = [r for r in cached.records if not any(r.computed)]
    assert len(computed) == len(reused) == 3
    for r in computed:  # the routing of a computed step: heads and tokens switched off
        assert r.routing.heads.mean() < 1 and r.routing.tokens.mean() < 1
    assert all(r.routing.heads.sum() == 0 for r in reused)  # a reused block runs nothing
    dit = dydit_lab.create_model("DiT-lab-T")
    dit.load_state_dict(dydit.state_dict(), strict=False)
    as_dydit = CachedModel(dydit, FORA(2)).sampling_cost(6)["flops_fraction"]
    as_dit = CachedModel(dit.eval(), FORA(2)).sampling_cost(6)["flops_fraction"]
    assert as_dydit < 0.9 * as_dit


def test_a_masked_dydit_is_cached_like_the_sliced_one():
    dydit = random_dydit()
    sliced = sample(CachedModel(dydit, FORA(2)))
    dydit.execution = "masked"
    masked_model = CachedModel(dydit, FORA(2))
    assert torch.allclose(sample(masked_model), sliced, atol=1e-5)
    assert masked_model.records[0].routing.tokens.mean() < 1


def test_a_new_run_or_batch_resets_the_caches():
    dit = tiny_dit()
    cached = CachedModel(dit, FORA(3))
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        for t in (900, 600, 300):
            cached(x, torch.tensor([t, t]), y)
        cached(x, torch.tensor([999, 999]), y)  # t went up: a new run
        cached(torch.randn(3, 1, 32, 32), torch.tensor([500] * 3), torch.tensor([1, 2, 3]))  # new batch
    assert [r.step for r in cached.records] == [0, 1, 2, 0, 0]
    assert [all(r.computed) for r in cached.records] == [True, False, False, True, True]


def test_toca_on_a_dydit_runs_its_width_and_its_token_router():
    """Full steps: the routed block; cache steps: the planned MLP groups on the fresh tokens the
    token router keeps, attention reused (no head runs)."""
    dydit = random_dydit()
    cached = CachedModel(dydit, ToCa(0.5, interval=2))
    run = cached.sampling_run(4, num_samples=3)
    full, partial = run["records"][0], run["records"][1]
    assert full.routing.heads.mean() < 1 and 0 < full.routing.tokens.mean() < 1
    assert partial.routing.heads.sum() == 0 and 0 < partial.routing.tokens.mean() <= 0.5
    assert partial.macs < full.macs
    as_dit = CachedModel(tiny_dit(), ToCa(0.5, interval=2)).sampling_cost(4)["flops_fraction"]
    assert run["flops_fraction"] < as_dit
    dydit.execution = "masked"
    with pytest.raises(ValueError, match="needs eval mode and sliced execution"):
        sample(CachedModel(dydit, ToCa(0.5, interval=2)))


def test_one_timestep_per_call_and_a_dit_to_wrap():
    cached = cached_model(tiny_dit(), "fora:2")
    with pytest.raises(ValueError, match=r"one timestep per call.*\[10, 900\]"):
        cached(torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="needs a DiT or a DyDiT"):
        CachedModel(torch.nn.Linear(2, 2), FORA(2))


def test_an_l2c_router_must_match_the_run():
    cached = CachedModel(tiny_dit(), LearningToCache(reuse_free_router(steps=50), 0.5))
    with pytest.raises(ValueError, match="trained for 50 sampling steps; this run has 6"):
        sample(cached)

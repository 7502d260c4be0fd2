"""The sliced DyDiT's fast paths: widths planned once per sampling run, blocks that keep every
token or none, plans that follow weight updates; on CUDA, at most one host sync per block."""

import warnings

import pytest
import torch

from dydit_lab.diffusion import GaussianDiffusion
from dydit_lab.models.routers import WidthRouter
from tests.helpers import random_dydit


def run_both(model, x, t, y):
    with torch.no_grad():
        model.execution = "masked"
        masked, r_masked = model(x, t, y, return_routing=True)
        model.execution = "sliced"
        sliced, r_sliced = model(x, t, y, return_routing=True)
    return masked, sliced, r_masked, r_sliced


def test_widths_are_planned_once_per_sampling_run(monkeypatch):
    model = random_dydit()
    calls = []
    original = WidthRouter.eval_gates
    monkeypatch.setattr(WidthRouter, "eval_gates", lambda self, t_emb: calls.append(len(t_emb)) or original(self, t_emb))
    diffusion = GaussianDiffusion().respaced(6)
    with torch.no_grad():
        diffusion.sample(model, torch.arange(3), (3, 1, 32, 32), method="ddim", progress=False)
    # one batched pass over the six timesteps per router (2 per block), none inside the steps
    assert calls == [6] * (2 * len(model.blocks))
    with torch.no_grad():  # a second run at the same timesteps reuses the plans
        diffusion.sample(model, torch.arange(3), (3, 1, 32, 32), method="ddim", progress=False)
    assert len(calls) == 2 * len(model.blocks)


@pytest.mark.parametrize("token_bias", [50.0, -50.0], ids=["all tokens kept", "no token kept"])
def test_blocks_that_keep_every_token_or_none_equal_the_masked_path(token_bias):
    model = random_dydit()
    for block in model.blocks:
        block.token_selection.mlp_head[2].bias.data.fill_(token_bias)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    for t in (torch.tensor([300] * 4), torch.tensor([10, 990, 10, 500])):
        masked, sliced, r_masked, r_sliced = run_both(model, x, t, y)
        assert ((sliced - masked).norm() / masked.norm()).item() < 1e-5
        assert torch.equal(r_sliced.tokens, r_masked.tokens)
        assert torch.equal(r_sliced.heads, r_masked.heads) and torch.equal(r_sliced.groups, r_masked.groups)
        assert r_sliced.tokens.all() if token_bias > 0 else not r_sliced.tokens.any()


def test_a_batch_of_one_equals_the_masked_path():
    """One sample takes the kept-token MLP without per-sample gathers of shift, scale and gate."""
    model = random_dydit()
    x, y = torch.randn(1, 1, 32, 32), torch.tensor([7])
    for t in (300, 900):
        masked, sliced, r_masked, r_sliced = run_both(model, x, torch.tensor([t]), y)
        assert ((sliced - masked).norm() / masked.norm()).item() < 1e-5
        assert torch.equal(r_sliced.tokens, r_masked.tokens)
        assert 0 < r_sliced.tokens.mean().item() < 1  # some tokens kept, some skipped


def test_host_and_device_timesteps_give_the_same_output():
    model = random_dydit()
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([4, 5])
    with torch.no_grad():
        a = model(x, torch.tensor([700, 700]), y)
        b = model(x, torch.full((2,), 700, dtype=torch.long), y)
    assert torch.equal(a, b)


def test_plans_follow_router_updates():
    model = random_dydit()
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([400, 400]), torch.tensor([1, 2])
    with torch.no_grad():
        before = model(x, t, y, return_routing=True)[1].heads
        for block in model.blocks:
            block.attn_rate.router.bias.add_(-100.0)  # in place: every switchable head off
        after = model(x, t, y, return_routing=True)[1].heads
    assert not torch.equal(before, after)
    assert after[:, :, 1:].sum() == 0 and after[:, :, 0].all()


@pytest.mark.cuda
def test_sliced_path_on_cuda_syncs_at_most_once_per_block_and_matches_masked():
    model = random_dydit().cuda()
    x, y = torch.randn(4, 1, 32, 32, device="cuda"), torch.arange(4, device="cuda")
    t_host = torch.full((4,), 500, dtype=torch.long)
    masked, sliced, _, _ = run_both(model, x, t_host.cuda(), y)
    assert ((sliced - masked).norm() / masked.norm()).item() < 1e-5
    model.plan_timesteps([500])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(x, t_host, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # each sync warns "called a synchronizing CUDA operation"; the mode's own "prototype" notice is no sync
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    # one per block for SDT's token count, plus at most the copy of the host timesteps
    assert len(syncs) <= len(model.blocks) + 1, [str(w.message) for w in syncs]

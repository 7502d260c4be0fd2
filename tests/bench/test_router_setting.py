"""The speed benchmark's router setting (dydit_lab.bench.router_setting): routers set to a FLOPs
target without training. No timing asserts."""

import pytest
import torch

from dydit_lab.bench import router_setting as bench
from dydit_lab.bench.run import run_benchmark
from dydit_lab.bench.workload import build_models, make_inputs
from dydit_lab.models.flops import dydit_flops_bounds
from tests.helpers import BENCH_BATCH as BATCH, BENCH_STEPS as STEPS


@torch.no_grad()
def _routings(dydit, inputs, execution="sliced"):
    dydit.execution = execution
    runs = [dydit(x, t, inputs.y, return_routing=True) for x, t in zip(inputs.x, inputs.t)]
    dydit.execution = "sliced"
    return runs


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_router_setting_hits_target(models, inputs, target):
    _, dydit = models
    setting = bench.set_routers(dydit, inputs, target)
    assert abs(setting.flops_ratio - target) <= 0.02
    runs = _routings(dydit, inputs)
    per_step = [float(r.flops_fraction(dydit.config).mean()) for _, r in runs]
    assert abs(sum(per_step) / STEPS - target) <= bench.TOLERANCE  # the routing a run really uses
    # width shrinks toward noisy timesteps (runs are in sampling order: t = 999 first)
    width = [float(r.heads.mean() + r.groups.mean()) for _, r in runs]
    assert all(a <= b for a, b in zip(width, width[1:]))
    assert width[0] < width[-1]
    # both mechanisms are exercised: some tokens skip the MLP, some heads are off
    keep = float(torch.stack([r.tokens.mean() for _, r in runs]).mean())
    assert 0.5 < keep < 1.0
    assert float(runs[0][1].heads.mean()) < 1.0
    # head 0 and group 0 are always on
    assert all(bool(r.heads[..., 0].all() and r.groups[..., 0].all()) for _, r in runs)


def test_router_setting_is_deterministic(models, inputs):
    _, dydit = models
    a = bench.set_routers(dydit, inputs, 0.6)
    state = {k: v.clone() for k, v in dydit.state_dict().items()}
    b = bench.set_routers(dydit, inputs, 0.6)
    assert a == b
    assert all(torch.equal(state[k], v) for k, v in dydit.state_dict().items())


def test_noise_level_fit_is_monotone_on_sampled_steps(models, inputs):
    _, dydit = models
    w, b, err = bench.fit_noise_level(dydit, inputs.timesteps)
    assert err < 0.05
    with torch.no_grad():
        s = dydit.t_embedder(torch.tensor(sorted(inputs.timesteps))).double() @ w + b
    assert bool((s[1:] > s[:-1]).all())


def test_sliced_and_masked_agree_on_bench_model(models, inputs):
    _, dydit = models
    bench.set_routers(dydit, inputs, 0.5)
    sliced, masked = _routings(dydit, inputs, "sliced"), _routings(dydit, inputs, "masked")
    for (a, ra), (b, rb) in zip(sliced, masked):
        assert torch.equal(ra.heads, rb.heads) and torch.equal(ra.groups, rb.groups)
        assert torch.equal(ra.tokens, rb.tokens)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [1.2, 0.01, -0.5, float("nan")])
def test_unreachable_targets_raise(models, inputs, target):
    with pytest.raises(ValueError, match="cannot be reached"):
        bench.set_routers(models[1], inputs, target)
    with pytest.raises(ValueError, match="cannot be reached"):
        run_benchmark("DiT-lab-T", target_ratio=target, device="cpu", models=models)


def test_floor_is_reachable_and_bounds_are_ordered(models, inputs):
    floor, full = dydit_flops_bounds(models[1].config)
    assert 0 < floor < 0.5 < 1 < full < 1.01  # all-on costs a little more: the routers
    bench.check_target(models[1].config, floor)
    with pytest.raises(ValueError):
        bench.check_target(models[1].config, floor - 1e-3)


def test_other_tiny_arch_hits_target():
    dit, dydit = build_models("DiT-S/8", input_size=16)
    inputs = make_inputs(dit, BATCH, STEPS)
    setting = bench.set_routers(dydit, inputs, 0.5)
    assert abs(setting.flops_ratio - 0.5) <= 0.02
    assert setting.per_step == sorted(setting.per_step)

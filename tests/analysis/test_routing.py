"""Routing traces of DyDiT sampling runs."""

import torch

from dydit_lab.analysis.routing import RoutingTrace, trace_sampling
from dydit_lab.models.dydit import sampling_flops
from tests.helpers import random_dydit


def test_trace_shapes_and_consistency(traces):
    trace = traces["model 0"]
    assert trace.timesteps == [999, 749, 500, 250, 0]
    assert trace.heads.shape == (5, 3, 2, 4) and trace.tokens.shape == (5, 3, 2, 16)
    assert trace.x_t.shape == (5, 3, 1, 32, 32) and trace.samples.shape == (3, 1, 32, 32)
    # TDW depends on t only: every sample at a step has the same width.
    assert (trace.heads == trace.heads[:, :1]).all()
    assert 0 < trace.mean_flops_fraction < 1
    assert trace.token_grid(0, 0, 0).shape == (4, 4)


def test_trace_widths_agree_with_the_sampling_count(traces):
    """TDW depends on t only: the FLOPs count's run (other labels) sees the trace's widths."""
    trace = traces["model 0"]
    assert isinstance(trace, RoutingTrace) and trace.name == "model 0"
    run = sampling_flops(random_dydit(0), steps=5, num_samples=3, progress=False)
    assert run["per_step_timesteps"] == trace.timesteps
    heads = trace.heads.float().mean(dim=(1, 2, 3))
    assert torch.allclose(torch.tensor(run["per_step_heads"]), heads)
    assert torch.allclose(trace.flops_fraction.mean(), torch.tensor(trace.mean_flops_fraction))


def test_trace_sampling_reproduces_from_its_seed():
    a = trace_sampling(random_dydit(2), [4, 5], steps=3, progress=False, seed=1)
    b = trace_sampling(random_dydit(2), [4, 5], steps=3, progress=False, seed=1)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.tokens, b.tokens)

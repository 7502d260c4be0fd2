"""A trained DyDiT timed on the inputs of its own sampling run against its complete model."""

import pytest
import torch

from dydit_lab.analysis.routing import trace_sampling
from dydit_lab.bench.checkpoint import checkpoint_speedup, trace_inputs
from tests.helpers import random_dydit, tiny_model


def test_trace_inputs_are_the_run_step_by_step(traces):
    trace = traces["model 0"]
    inputs = trace_inputs(trace)
    assert inputs.timesteps == trace.timesteps and inputs.batch_size == 3
    assert torch.equal(inputs.x[2], trace.x_t[2]) and inputs.t[2].tolist() == [trace.timesteps[2]] * 3
    assert torch.equal(inputs.y, trace.labels)


def test_checkpoint_speedup_times_the_routing_of_a_real_run():
    model = random_dydit(0)
    record = checkpoint_speedup(model, batch_size=3, steps=4, repeats=1, device="cpu", name="mine")
    assert record["name"] == "mine" and record["device"] == "cpu" and record["batch_size"] == 3
    # the timed passes route as the recorded run did: same inputs, same routers
    trace = trace_sampling(model, [0, 1, 2], steps=4, progress=False)
    assert record["flops_ratio"] == pytest.approx(trace.mean_flops_fraction, rel=1e-6)
    assert record["token_keep_rate"] == pytest.approx(float(trace.tokens.float().mean()), rel=1e-6)
    for path in ("static", "dynamic", "masked"):
        assert record[f"{path}_seconds"] > 0
    assert record["speedup"] == pytest.approx(record["static_seconds"] / record["dynamic_seconds"])
    assert record["ideal_speedup"] == pytest.approx(1 / record["flops_ratio"])
    assert record["num_threads"] == torch.get_num_threads()
    assert record["static_pass_spread"] == 0  # one timed pass: nothing to spread
    assert all(len(record[f"{path}_pass_seconds"]) == 1 for path in ("static", "dynamic", "masked"))
    # the sliced outputs are the masked path's, decision for decision
    assert record["token_decisions"] == 3 * 4 * len(model.blocks) * model.x_embedder.num_patches
    assert record["token_decisions_flipped"] == 0 and record["max_relative_diff_sliced_masked"] < 1e-5


def test_only_a_dydit_has_a_speedup_to_measure():
    with pytest.raises(ValueError, match="needs a DyDiT"):
        checkpoint_speedup(tiny_model(), steps=2)
    with pytest.raises(ValueError, match="must be positive"):
        checkpoint_speedup(random_dydit(0), batch_size=0)
    with pytest.raises(ValueError, match="threads must be positive"):
        checkpoint_speedup(random_dydit(0), threads=0)

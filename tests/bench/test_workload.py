"""The speed benchmark's workload (dydit_lab.bench.workload): inputs along a respaced process,
random-weight models sharing their weights. No timing asserts."""

import torch

from tests.helpers import BENCH_BATCH as BATCH, BENCH_STEPS as STEPS


def test_inputs_follow_a_respaced_process(inputs):
    assert inputs.timesteps == [999, 666, 333, 0]  # sampling order, noisiest first
    assert len(inputs.x) == STEPS and inputs.x[0].shape == (BATCH, 1, 32, 32)
    assert all(torch.equal(t, torch.full((BATCH,), ts)) for t, ts in zip(inputs.t, inputs.timesteps))
    # the noisiest input is (nearly) pure noise, the cleanest (nearly) the smooth latent
    assert abs(float(inputs.x[0].std()) - 1.0) < 0.3


def test_models_share_weights_and_are_not_trivial(models, inputs):
    dit, dydit = models
    with torch.no_grad():
        out = dit(inputs.x[1], inputs.t[1], inputs.y)
        full = dydit(inputs.x[1], inputs.t[1], inputs.y, complete_model=True)
    assert out.abs().mean() > 1e-3  # adaLN-Zero layers were given random weights
    torch.testing.assert_close(out, full)

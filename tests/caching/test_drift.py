"""caching_drift: a reuse-free spec stays on the plain trajectory, reuse drifts off it, and the
blocks each step computed are the policy's (FORA N: every N-th step computes)."""

import pytest
import torch

import dydit_lab
from dydit_lab.caching import caching_drift, relative_distance
from tests.helpers import randomised

STEPS, DEPTH = 6, 2  # DiT-lab-T has 2 blocks


@pytest.fixture
def dit():
    torch.manual_seed(0)
    return randomised(dydit_lab.create_model("DiT-lab-T"))


def test_relative_distance_is_per_sample_and_scale_free():
    ref = torch.ones(2, 1, 4, 4)
    x = ref.clone()
    x[0] *= 1.5  # sample 0 is 50 % off, sample 1 exact
    assert relative_distance(x, ref) == pytest.approx(0.25)
    assert relative_distance(10 * x, 10 * ref) == pytest.approx(0.25)


def test_reuse_free_stays_on_the_plain_trajectory_and_reuse_drifts(dit):
    drift = caching_drift(dit, {"none": "fora:1", "FORA 3": "fora:3"}, steps=STEPS, num_samples=3, progress=False)
    summary = drift.summary.set_index("setting")
    assert summary.loc["none", "final_error"] == 0.0
    assert summary.loc["none", "blocks_computed"] == 1.0
    assert summary.loc["FORA 3", "final_error"] > 1e-4
    assert summary.loc["FORA 3", "blocks_computed"] == pytest.approx(2 / STEPS)  # steps 0 and 3 compute
    assert summary.loc["FORA 3", "flops_fraction"] < summary.loc["none", "flops_fraction"] == pytest.approx(1.0)

    fora = drift.per_step[drift.per_step.setting == "FORA 3"]
    assert list(fora.step) == list(range(STEPS))
    assert list(fora.blocks) == [DEPTH, 0, 0, DEPTH, 0, 0]
    assert list(fora.t) == sorted(fora.t, reverse=True)
    assert fora.error.iloc[0] == 0.0  # the first step computes: the same x_t as the plain run
    assert fora.error.iloc[-1] == pytest.approx(summary.loc["FORA 3", "final_error"])
    none = drift.per_step[drift.per_step.setting == "none"]
    assert (none.error == 0).all() and list(none.flops_fraction) == pytest.approx([1.0] * STEPS)


def test_bad_arguments_are_named(dit):
    with pytest.raises(ValueError, match="at least one cache spec"):
        caching_drift(dit, {})
    with pytest.raises(ValueError, match="positive"):
        caching_drift(dit, {"x": "fora:2"}, steps=0)
    with pytest.raises(ValueError, match="unknown cache policy"):
        caching_drift(dit, {"x": "nope:2"}, steps=2, num_samples=1, progress=False)

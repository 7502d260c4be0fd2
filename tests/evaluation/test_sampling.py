"""Sampling for evaluation: balanced labels, any model (schedules, wrappers), timing, errors."""

import pytest
import torch

from dydit_lab.evaluation.sampling import generate, timed_generate
from dydit_lab.models.flexidit import FlexiDiT, scheduled_model


def test_schedule_works_with_generate(tiny):
    sched = scheduled_model(FlexiDiT.from_dit(tiny), coarse_steps=2, total_steps=4)
    samples, labels = generate(sched, 3, steps=4, batch_size=3, progress=False)
    assert samples.shape == (3, 1, 32, 32) and torch.isfinite(samples).all()
    assert [p for _, p in sched.calls] == [16, 16, 8, 8]


def test_generate_is_balanced_seeded_and_restores_the_mode(tiny):
    tiny.train()
    samples, labels = generate(tiny, 12, steps=2, batch_size=5, progress=False)
    assert samples.shape == (12, 1, 32, 32) and labels.tolist() == [i % 10 for i in range(12)]
    again, _ = generate(tiny, 12, steps=2, batch_size=5, progress=False)
    assert torch.equal(samples, again) and tiny.training
    _, _, seconds = timed_generate(tiny, 2, steps=2, progress=False)
    assert seconds > 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_generate_refuses_bad_sample_counts(tiny, bad):
    with pytest.raises(ValueError, match=f"positive integer, got {bad!r}"):
        generate(tiny, bad, steps=2, progress=False)

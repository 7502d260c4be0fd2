"""95 % bootstrap intervals of FD-LeNet and accuracy over generated samples."""

import pytest
import torch

from dydit_lab.evaluation.metrics import bootstrap_intervals, frechet_distance, gaussian_stats


def test_intervals_bracket_the_accuracy_and_shrink_with_more_samples():
    gen = torch.Generator().manual_seed(0)
    reference = gaussian_stats(torch.randn(4000, 8, generator=gen))
    widths = []
    for n in (200, 3200):
        features = torch.randn(n, 8, generator=gen)
        correct = torch.rand(n, generator=gen) < 0.8
        iv = bootstrap_intervals(features, correct, reference, rounds=200, seed=1)
        accuracy = correct.float().mean().item()
        assert iv["accuracy_lo"] <= accuracy <= iv["accuracy_hi"]
        fd = frechet_distance(gaussian_stats(features), reference)
        assert iv["fd_lenet_lo"] <= fd <= iv["fd_lenet_hi"]  # the estimate lies inside its interval
        widths.append(iv["accuracy_hi"] - iv["accuracy_lo"])
    assert widths[1] < widths[0] / 2  # 16x the samples: about a quarter of the width


def test_intervals_are_reproducible_and_reject_too_few_rounds():
    gen = torch.Generator().manual_seed(0)
    features, correct = torch.randn(100, 4, generator=gen), torch.rand(100, generator=gen) < 0.5
    reference = gaussian_stats(torch.randn(500, 4, generator=gen))
    assert bootstrap_intervals(features, correct, reference, 50, seed=3) == \
        bootstrap_intervals(features, correct, reference, 50, seed=3)
    with pytest.raises(ValueError, match="at least 2 rounds"):
        bootstrap_intervals(features, correct, reference, rounds=1)


def test_the_fd_interval_holds_its_estimate_where_the_percentile_one_does_not():
    # Features close to the reference: FD is small and the resampling bias exceeds the spread.
    gen = torch.Generator().manual_seed(0)
    reference_features = torch.randn(5000, 16, generator=gen)
    features = reference_features[:1000] + 0.05 * torch.randn(1000, 16, generator=gen)
    reference = gaussian_stats(reference_features)
    fd = frechet_distance(gaussian_stats(features), reference)
    iv = bootstrap_intervals(features, torch.ones(1000, dtype=torch.bool), reference, rounds=200, seed=0)
    assert iv["fd_lenet_lo"] <= fd <= iv["fd_lenet_hi"]
    resampled = [frechet_distance(gaussian_stats(features[torch.randint(1000, (1000,), generator=gen)]), reference)
                 for _ in range(50)]
    assert min(resampled) > fd  # the plain percentile interval would lie wholly above the estimate

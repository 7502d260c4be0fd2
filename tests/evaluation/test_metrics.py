"""FD-LeNet and class accuracy."""

import pytest
import torch

from dydit_lab.data import mnist_split
from dydit_lab.evaluation.metrics import LeNet, SampleEvaluator, frechet_distance, gaussian_stats, load_classifier
from dydit_lab.paths import DEFAULT_CLASSIFIER


def test_frechet_distance_of_gaussians():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(a)) == pytest.approx(0, abs=1e-6)
    # Shifted mean adds ||mu||^2; doubled std adds tr(S1 + S2 - 2 sqrt(S1 S2)) = 3 * (1 + 4 - 4).
    b = torch.randn(20000, 3) * 2 + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(gaussian_stats(a), gaussian_stats(b)) == pytest.approx(4.0, abs=0.15)



def test_real_digits_score_well(evaluator):
    x, y = mnist_split("val").tensors
    metrics = evaluator.score(x, y)
    assert metrics["accuracy"] > 0.95
    noise = evaluator.score(torch.rand_like(x) * 2 - 1, y)
    assert noise["accuracy"] < 0.3 and noise["fd_lenet"] > 10 * metrics["fd_lenet"]


def test_missing_classifier_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "none.pt")


def test_default_classifier_is_the_committed_one(evaluator):
    assert DEFAULT_CLASSIFIER.exists()
    net = load_classifier(DEFAULT_CLASSIFIER)
    assert isinstance(net, LeNet) and not net.training
    assert isinstance(evaluator, SampleEvaluator) and evaluator.reference[0].shape == (128,)

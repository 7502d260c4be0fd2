"""FD-LeNet and class accuracy."""

import json

import pytest
import torch

import dydit_lab
from dydit_lab.cli import main
from dydit_lab.data import mnist_split
from dydit_lab.evaluation import (DEFAULT_CLASSIFIER, SampleEvaluator, frechet_distance,
                                  gaussian_stats, load_classifier)
from dydit_lab.results import read_results, record_result


def test_frechet_distance_of_gaussians():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(a)) == pytest.approx(0, abs=1e-6)
    # Shifted mean adds ||mu||^2; doubled std adds tr(S1 + S2 - 2 sqrt(S1 S2)) = 3 * (1 + 4 - 4).
    b = torch.randn(20000, 3) * 2 + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(gaussian_stats(a), gaussian_stats(b)) == pytest.approx(4.0, abs=0.15)


@pytest.fixture(scope="module")
def evaluator():
    return SampleEvaluator(load_classifier(DEFAULT_CLASSIFIER))


def test_real_digits_score_well(evaluator):
    x, y = mnist_split("val").tensors
    metrics = evaluator.score(x, y)
    assert metrics["accuracy"] > 0.95
    noise = evaluator.score(torch.rand_like(x) * 2 - 1, y)
    assert noise["accuracy"] < 0.3 and noise["fd_lenet"] > 10 * metrics["fd_lenet"]


def test_missing_classifier_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "none.pt")


def test_evaluate_cli_records_results(tmp_path, capsys):
    model = dydit_lab.create_model("DiT-lab-T")
    torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "m.pt")
    results = tmp_path / "results.csv"
    main(["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--num-samples", "20", "--steps", "2",
          "--device", "cpu", "--results", str(results), "--name", "tiny"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_lenet"] > 0
    record_result(results, {"name": "other", "accuracy": 0.5})
    record_result(results, {"name": "tiny", "accuracy": 0.25})  # replaces, not appends
    rows = {r["name"]: r for r in read_results(results)}
    assert set(rows) == {"tiny", "other"} and rows["tiny"]["accuracy"] == "0.25"


def test_record_result_writes_none_as_empty(tmp_path):
    path = tmp_path / "r.csv"
    record_result(path, {"name": "a", "coarse_steps": None, "accuracy": 0.5})
    assert read_results(path)[0]["coarse_steps"] == ""

"""FD-LeNet and class accuracy; training the LeNet judge; the second judge (another seed)."""

import pytest
import torch

from dydit_lab.evaluation.metrics import (LeNet, SampleEvaluator, alt_key, frechet_distance, gaussian_stats,
                                          load_classifier, train_classifier)
from dydit_lab.paths import DEFAULT_CLASSIFIER, SECOND_CLASSIFIER


def test_frechet_distance_of_gaussians():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    assert frechet_distance(gaussian_stats(a), gaussian_stats(a)) == pytest.approx(0, abs=1e-6)
    # Shifted mean adds ||mu||^2; doubled std adds tr(S1 + S2 - 2 sqrt(S1 S2)) = 3 * (1 + 4 - 4).
    b = torch.randn(20000, 3) * 2 + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(gaussian_stats(a), gaussian_stats(b)) == pytest.approx(4.0, abs=0.15)



def test_real_digits_score_well(evaluator, val_digits):
    x, y = val_digits
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


# ---------------------------------------------------------------------------
# Training a judge, and the second judge that checks the metric
# ---------------------------------------------------------------------------


def test_train_classifier_is_deterministic_per_seed(tmp_path, small_mnist):
    first = train_classifier(tmp_path / "a.pt", epochs=1, seed=3, progress=False)
    again = train_classifier(tmp_path / "b.pt", epochs=1, seed=3, progress=False)
    other = train_classifier(tmp_path / "c.pt", epochs=1, seed=4, progress=False)
    weights = {k: torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in "abc"}
    assert all(torch.equal(v, weights["b"]["state_dict"][k]) for k, v in weights["a"]["state_dict"].items())
    assert not torch.equal(weights["a"]["state_dict"]["fc2.weight"], weights["c"]["state_dict"]["fc2.weight"])
    assert first["val_accuracy"] == again["val_accuracy"] and (first["seed"], other["seed"]) == (3, 4)
    assert weights["c"]["seed"] == 4 and weights["c"]["epochs"] == 1 and first["seconds"] > 0
    assert first["out"] == str(tmp_path / "a.pt")
    assert isinstance(load_classifier(tmp_path / "c.pt"), LeNet)


def test_train_classifier_refuses_bad_input(tmp_path):
    (tmp_path / "taken.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="taken.pt exists: pass --overwrite"):
        train_classifier(tmp_path / "taken.pt", epochs=1)
    with pytest.raises(ValueError, match="is a directory"):
        train_classifier(tmp_path, epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        train_classifier(tmp_path / "new.pt", epochs=0)


def test_bad_classifier_files_are_named(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": {}}, tmp_path / "nodict.pt")
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, tmp_path / "other.pt")
    for name, kind, message in (("text.pt", ValueError, "is not a classifier file"),
                                ("nodict.pt", ValueError, "no 'state_dict'"),
                                ("other.pt", ValueError, "holds no LeNet"),
                                ("absent.pt", FileNotFoundError, "no classifier at")):
        with pytest.raises(kind, match=message) as err:
            load_classifier(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_a_second_judge_scores_the_same_samples(small_mnist, val_digits):
    """The same LeNet as second judge gives the same numbers (same samples, same resamples;
    256 reference digits suffice here)."""
    net = load_classifier(DEFAULT_CLASSIFIER)
    twin = SampleEvaluator(net, second=net)
    x, y = val_digits
    scores = twin.score(x[:200], y[:200], bootstrap=20, seed=5)
    main_keys = ["accuracy", "fd_lenet", "accuracy_lo", "accuracy_hi", "fd_lenet_lo", "fd_lenet_hi"]
    assert sorted(scores) == sorted(main_keys + [alt_key(k) for k in main_keys])
    assert all(scores[alt_key(k)] == scores[k] for k in main_keys)
    assert "fd_lenet_alt_lo" in scores and alt_key("accuracy_hi") == "accuracy_alt_hi"
    with pytest.raises(ValueError, match="not a metric key"):
        alt_key("seconds")


def test_the_committed_second_judge_is_another_seed(evaluator, small_mnist, val_digits):
    """data/lenet_mnist_seed1.pt: `train-classifier --seed 1`, another LeNet, as good a judge."""
    saved = torch.load(SECOND_CLASSIFIER, weights_only=True)
    assert saved["seed"] == 1 and saved["epochs"] == 15 and saved["val_accuracy"] > 0.95
    assert evaluator.second is not None and evaluator.second_file == "data/lenet_mnist_seed1.pt"
    assert not torch.equal(evaluator.second.fc2.weight, evaluator.classifier.fc2.weight)
    x, y = val_digits
    scores = evaluator.score(x, y)
    assert scores["accuracy_alt"] > 0.95 and scores["fd_lenet_alt"] != scores["fd_lenet"]
    single = SampleEvaluator(evaluator.classifier)
    assert single.second is None and "fd_lenet_alt" not in single.score(x[:50], y[:50])

"""The classifier commands: `train-classifier`, `rescore`, and `evaluate`'s two judges."""

import json

import pytest
import torch

from dydit_lab.cli import build_parser, main
from dydit_lab.evaluation.metrics import LeNet
from dydit_lab.evaluation.report import evaluate_checkpoint
from dydit_lab.evaluation.results import read_results, record_result
from dydit_lab.paths import SECOND_CLASSIFIER
from tests.helpers import cli_error

TINY = ["--num-samples", "10", "--steps", "2", "--bootstrap", "10", "--device", "cpu"]


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_classifier_command(tmp_path, small_mnist, capsys):
    out = tmp_path / "lenet.pt"
    main(["train-classifier", "--out", str(out), "--epochs", "1", "--seed", "7"])
    result = last_json(capsys)
    assert result["seed"] == 7 and result["epochs"] == 1 and 0 <= result["val_accuracy"] <= 1
    assert torch.load(out, weights_only=True)["seed"] == 7
    err = cli_error(capsys, ["train-classifier", "--out", str(out), "--epochs", "1"])
    assert str(out) in err and "--overwrite" in err
    main(["train-classifier", "--out", str(out), "--epochs", "1", "--seed", "8", "--overwrite"])
    assert torch.load(out, weights_only=True)["seed"] == 8
    capsys.readouterr()
    assert "positive integer" in cli_error(capsys, ["train-classifier", "--out", str(tmp_path / "x.pt"),
                                                    "--epochs", "0"])


def test_evaluate_scores_with_both_classifiers(strategy_checkpoints, tmp_path, cached_mnist, capsys):
    args = build_parser().parse_args(["evaluate", "--checkpoint", "m.pt"])
    assert args.second_classifier == str(SECOND_CLASSIFIER)  # by default, the committed seed-1 LeNet
    checkpoint = str(strategy_checkpoints / "DiT-lab-L.pt")
    main(["evaluate", "--checkpoint", checkpoint, *TINY, "--second-classifier", "none"])
    single = last_json(capsys)
    assert "fd_lenet_alt" not in single and "classifier_alt" not in single
    torch.manual_seed(1)
    torch.save({"state_dict": LeNet().state_dict()}, tmp_path / "random.pt")  # any LeNet may judge
    main(["evaluate", "--checkpoint", checkpoint, *TINY, "--second-classifier", str(tmp_path / "random.pt")])
    both = last_json(capsys)
    assert both["fd_lenet"] == pytest.approx(single["fd_lenet"]) and both["fd_lenet_alt"] != both["fd_lenet"]
    assert both["classifier_alt"] == str(tmp_path / "random.pt")
    assert {"fd_lenet_alt", "fd_lenet_alt_lo", "fd_lenet_alt_hi", "accuracy_alt", "accuracy_alt_lo",
            "accuracy_alt_hi"} <= set(both)


def test_evaluate_names_a_bad_classifier_file(strategy_checkpoints, tmp_path, cached_mnist, capsys):
    checkpoint = str(strategy_checkpoints / "DiT-lab-L.pt")
    err = cli_error(capsys, ["evaluate", "--checkpoint", checkpoint, *TINY,
                             "--second-classifier", str(tmp_path / "absent.pt")])
    assert f"no classifier at {tmp_path / 'absent.pt'}" in err
    (tmp_path / "junk.pt").write_text("junk")
    err = cli_error(capsys, ["evaluate", "--checkpoint", checkpoint, *TINY, "--classifier", str(tmp_path / "junk.pt")])
    assert f"{tmp_path / 'junk.pt'} is not a classifier file" in err


def test_rescore_command(strategy_checkpoints, tmp_path, evaluator, cached_mnist, capsys):
    results = tmp_path / "r.csv"
    for name, seed in (("a", 0), ("b", 1)):  # rows scored by the main judge only
        row = evaluate_checkpoint(strategy_checkpoints / "DiT-lab-L.pt", num_samples=10, steps=2, seed=seed,
                                  bootstrap=10, evaluator=evaluator, progress=False)
        record_result(results, {k: v for k, v in row.items() if "alt" not in k} | {"name": name})
    err = cli_error(capsys, ["rescore", "--names", "a", "b", "--results", str(results), "--check-only"])
    assert "without fd_lenet and fd_lenet_alt ['a', 'b']" in err
    main(["rescore", "--names", "a", "b", "--results", str(results), "--device", "cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(("holds: ", "FLIPS: ")) and "second classifier" in out[-1]
    rows = {r["name"]: r for r in read_results(results)}
    assert all(rows[n]["fd_lenet_alt"] and rows[n]["classifier_alt"] for n in "ab")
    main(["rescore", "--names", "a", "b", "--results", str(results), "--check-only"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == out[-1]

"""The second classifier threaded through: evaluate_checkpoint rows, rows scored again
(report.rescore_row / rescore_results), and the sweep's evaluate option."""

import textwrap

import pytest

from dydit_lab.evaluation.report import evaluate_checkpoint, recorded_settings, rescore_results, rescore_row
from dydit_lab.evaluation.results import read_results, record_result
from dydit_lab.sweep import EVALUATE_OPTIONS, read_spec

TINY = dict(num_samples=10, steps=2, bootstrap=10, progress=False)


@pytest.fixture(scope="module")
def tiny_row(strategy_checkpoints, evaluator):
    """A row of the tiny DiT scored by the committed judges, as record_result stores it."""
    metrics = evaluate_checkpoint(strategy_checkpoints / "DiT-lab-L.pt", seed=3, evaluator=evaluator, **TINY)
    return {**{k: "" if v is None else str(v) for k, v in metrics.items()}, "name": "tiny"}


def test_rows_carry_both_scores(tiny_row):
    for key in ("fd_lenet", "accuracy"):
        for suffix in ("", "_lo", "_hi"):
            assert tiny_row[key + suffix] != "" and tiny_row[f"{key}_alt{suffix}"] != ""
        assert float(tiny_row[f"{key}_alt_lo"]) <= float(tiny_row[f"{key}_alt_hi"])
    assert tiny_row["classifier_alt"] == "data/lenet_mnist_seed1.pt" and tiny_row["bootstrap"] == "10"
    assert tiny_row["fd_lenet_alt"] != tiny_row["fd_lenet"]


def test_recorded_settings_of_old_and_new_rows(tiny_row):
    settings = recorded_settings(tiny_row)
    assert settings == {"num_samples": 10, "steps": 2, "method": "ddim", "cfg_scale": 1.0, "seed": 3,
                        "coarse_steps": None, "cache": None, "complete_model": False, "complete_from_t": 0,
                        "bootstrap": 10}
    old = recorded_settings({"name": "old", "checkpoint": "x.pt", "fd_lenet": "20", "fd_lenet_lo": "19"})
    assert old["seed"] == 0 and old["num_samples"] == 1000 and old["bootstrap"] == 500


def test_rescore_adds_the_second_score_and_keeps_other_columns(tiny_row, evaluator):
    old = {k: v for k, v in tiny_row.items() if "_alt" not in k and k != "classifier_alt"}
    old |= {"seconds_per_image": "123.0", "sweep": "parents"}
    new = rescore_row(old, evaluator)
    assert new["fd_lenet"] == pytest.approx(float(tiny_row["fd_lenet"]), rel=1e-6)
    assert new["fd_lenet_alt"] == pytest.approx(float(tiny_row["fd_lenet_alt"]), rel=1e-6)
    assert new["fd_lenet_alt_hi"] == pytest.approx(float(tiny_row["fd_lenet_alt_hi"]), rel=1e-6)
    assert new["seconds_per_image"] == "123.0" and new["sweep"] == "parents"
    assert new["classifier_alt"] == "data/lenet_mnist_seed1.pt"


def test_rescore_refuses_rows_it_cannot_reproduce(tiny_row, evaluator, tmp_path):
    wrong = {**tiny_row, "seed": "4"}  # other samples than the ones scored
    with pytest.raises(ValueError, match=r"row 'tiny': FD-LeNet .* recorded .* \(not re-scored\)"):
        rescore_row(wrong, evaluator)
    with pytest.raises(FileNotFoundError, match="row 'gone': checkpoint .*absent.pt not found"):
        rescore_row({**tiny_row, "name": "gone", "checkpoint": str(tmp_path / "absent.pt")}, evaluator)


def test_rescore_results_upserts_good_rows_and_names_the_rest(tiny_row, evaluator, tmp_path):
    results = tmp_path / "r.csv"
    record_result(results, {k: v for k, v in tiny_row.items() if "_alt" not in k})
    record_result(results, {**tiny_row, "name": "wrong seed", "seed": "4"})
    with pytest.raises(ValueError, match=r"no rows named \['nope'\]"):
        rescore_results(results, ["tiny", "nope"], evaluator, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="1 of 2 row.* not re-scored: row 'wrong seed'"):
        rescore_results(results, ["tiny", "wrong seed"], evaluator, progress=False, log=lambda _: None)
    rows = {r["name"]: r for r in read_results(results)}
    assert rows["tiny"]["fd_lenet_alt"] != "" and rows["wrong seed"]["seed"] == "4"


def test_real_val_rows_are_rescored_on_real_digits(evaluator, cached_mnist, val_digits):
    fd = evaluator.score(*val_digits)["fd_lenet"]
    real = {"name": "real-val", "checkpoint": "real-val", "fd_lenet": str(fd)}
    new = rescore_row(real, evaluator)
    assert new["accuracy_alt"] > 0.95 and "fd_lenet_alt_lo" not in new


def test_sweep_spec_names_the_second_classifier(tmp_path):
    assert "second_classifier" in EVALUATE_OPTIONS

    def spec(value):
        path = tmp_path / "spec.toml"
        path.write_text(textwrap.dedent(f"""
            name = "s"
            command = "train"
            out = "{tmp_path / 'runs'}"
            [evaluate]
            second_classifier = "{value}"
        """))
        return path

    assert read_spec(spec("data/lenet_mnist_seed1.pt")).evaluate["second_classifier"] == "data/lenet_mnist_seed1.pt"
    assert read_spec(spec("")).evaluate["second_classifier"] == ""
    with pytest.raises(FileNotFoundError, match="second_classifier .*missing.pt not found"):
        read_spec(spec(tmp_path / "missing.pt"))

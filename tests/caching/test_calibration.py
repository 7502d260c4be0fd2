"""TeaCache calibration and L2C router training run in seconds on DiT-lab-T; the CLI writes both."""

import json

import pytest
import torch

from dydit_lab.caching import (CachedModel, LearningToCache, TeaCache, calibrate_teacache, load_coefficients,
                               load_router, save_coefficients, save_router, train_cache_router)
from dydit_lab.evaluation.metrics import SampleEvaluator
from dydit_lab.cli import main
from tests.caching.test_policies import sample, tiny_dit


def test_teacache_calibration_fits_a_polynomial(tmp_path):
    result = calibrate_teacache(tiny_dit(), steps=6, num_samples=3, runs=2, degree=2)
    assert len(result["coefficients"]) == 3 and len(result["points"]) == 2 * 5  # 5 step pairs per run
    assert all(a > 0 and b > 0 for a, b in result["points"])
    coefficients = load_coefficients(save_coefficients(tmp_path / "tc.json", result))
    assert coefficients == result["coefficients"]
    sample(CachedModel(tiny_dit(), TeaCache(0.5, coefficients)))
    with pytest.raises(ValueError, match="cannot fit a degree-4 polynomial"):
        calibrate_teacache(tiny_dit(), steps=3, num_samples=2, runs=1)


def test_l2c_training_pushes_towards_reuse(tmp_path):
    router = train_cache_router(tiny_dit(), steps=6, num_samples=4, iterations=30, batch_size=2, l1=1.0, lr=0.3,
                                progress=False)
    weights = torch.sigmoid(router["logits"])
    assert router["logits"].shape == (6, 2) and router["seconds"] < 60
    assert weights[1::2].mean() < 0.5 < weights[0::2].mean()  # only the odd steps were trained
    loaded = load_router(save_router(tmp_path / "r.pt", router))
    policy = LearningToCache(loaded, 0.5)
    assert policy.reuse_fraction() > 0.25
    cached = CachedModel(tiny_dit(), policy)
    sample(cached)
    assert [sum(r.computed) for r in cached.records][::2] == [2, 2, 2]  # even steps run in full
    with pytest.raises(FileNotFoundError, match="no L2C router at"):
        load_router(tmp_path / "missing.pt")
    torch.save({"steps": 6}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="holds no L2C router"):
        load_router(tmp_path / "other.pt")


def test_cli_calibrates_trains_and_evaluates_with_a_cache(exported_parent, tmp_path, capsys, evaluator,
                                                         monkeypatch):
    monkeypatch.setattr(SampleEvaluator, "from_files", lambda *args, **kwargs: evaluator)  # the session's judge
    main(["calibrate-teacache", "--parent", str(exported_parent), "--steps", "6", "--num-samples", "2",
          "--runs", "3", "--out", str(tmp_path / "tc.json"), "--device", "cpu"])
    assert json.loads((tmp_path / "tc.json").read_text())["arch"] == "DiT-lab-T"
    main(["train-cache-router", "--parent", str(exported_parent), "--steps", "4", "--num-samples", "2",
          "--iterations", "3", "--out", str(tmp_path / "r.pt"), "--device", "cpu", "--quiet"])
    assert "wrote" in capsys.readouterr().out and load_router(tmp_path / "r.pt")["steps"] == 4
    main(["evaluate", "--checkpoint", str(exported_parent), "--num-samples", "10", "--steps", "4",
          "--cache", f"teacache:0.2,coef={tmp_path / 'tc.json'}", "--bootstrap", "0", "--device", "cpu"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["cache"].startswith("teacache:0.2") and row["flops_fraction"] <= 1.0 + 1e-3
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(exported_parent), "--cache", "fora:0", "--num-samples", "2"])
    assert exit_info.value.code == 2 and "FORA interval must be a positive integer, got 0" in capsys.readouterr().err

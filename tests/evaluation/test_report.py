"""One checkpoint, one sampling setting: quality, compute and wall-clock (evaluate_checkpoint)."""

import pytest

import dydit_lab
from dydit_lab.evaluation.report import count_flops_report, evaluate_checkpoint
from dydit_lab.evaluation.sampling import sampling_model
from dydit_lab.models.flops import analytic_flops, schedule_flops
from dydit_lab.models.dydit import CompleteModel, DyDiT
from dydit_lab.models.flexidit import PatchSchedule


def test_flexidit_schedule_costs_and_times(strategy_checkpoints, evaluator):
    path = strategy_checkpoints / "FlexiDiT-lab-L-adapters.pt"
    native = evaluate_checkpoint(path, num_samples=10, steps=4, evaluator=evaluator, progress=False)
    coarse = evaluate_checkpoint(path, num_samples=10, steps=4, coarse_steps=2, evaluator=evaluator,
                                 progress=False)
    config = dydit_lab.create_model("DiT-lab-T").config
    assert native["gflops_per_step"] == pytest.approx(analytic_flops(config)["total"] / 1e9)
    assert coarse["gflops_per_image"] == pytest.approx(schedule_flops(config, None, 2, 4)["total_gflops"])
    assert coarse["gflops_per_image"] < native["gflops_per_image"]
    for metrics in (native, coarse):
        assert metrics["seconds_per_image"] > 0 and metrics["train_steps"] == 7
        assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_lenet"] > 0


def test_coarse_steps_need_a_flexidit(strategy_checkpoints, evaluator):
    with pytest.raises(ValueError, match="FlexiDiT"):
        evaluate_checkpoint(strategy_checkpoints / "DiT-lab-L.pt", num_samples=4, steps=2, coarse_steps=1,
                            evaluator=evaluator, progress=False)


def test_complete_model_evaluation_of_a_dydit(strategy_checkpoints, evaluator):
    full = evaluate_checkpoint(strategy_checkpoints / "DyDiT-lab-L-0.5.pt", num_samples=10, steps=2,
                               complete_model=True, evaluator=evaluator, progress=False)
    static = analytic_flops(dydit_lab.create_model("DiT-lab-T").config)["total"] / 1e9
    assert full["gflops_per_step"] == pytest.approx(static) and full["flops_fraction"] == 1.0
    # Routers start all-on, so the converted model and its complete model sample the same digits.
    routed = evaluate_checkpoint(strategy_checkpoints / "DyDiT-lab-L-0.5.pt", num_samples=10, steps=2,
                                 evaluator=evaluator, progress=False)
    assert routed["fd_lenet"] == pytest.approx(full["fd_lenet"], rel=1e-4)
    with pytest.raises(ValueError, match="DyDiT"):
        evaluate_checkpoint(strategy_checkpoints / "DiT-lab-L.pt", num_samples=4, steps=2, complete_model=True,
                            evaluator=evaluator, progress=False)


def test_complete_model_evaluation_with_guidance(strategy_checkpoints, evaluator):
    """A CompleteModel samples with classifier-free guidance (it used to crash: no forward_with_cfg)."""
    metrics = evaluate_checkpoint(strategy_checkpoints / "DyDiT-lab-L-0.5.pt", num_samples=4, steps=2,
                                  cfg_scale=2.0, complete_model=True, evaluator=evaluator, progress=False)
    static = analytic_flops(dydit_lab.create_model("DiT-lab-T").config)["total"] / 1e9
    assert metrics["cfg_scale"] == 2.0 and metrics["gflops_per_image"] == pytest.approx(2 * 2 * static)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fd_lenet"] > 0


def test_sampling_model_wraps_as_asked(strategy_checkpoints):
    dydit = strategy_checkpoints / "DyDiT-lab-L-0.5.pt"
    assert isinstance(sampling_model(dydit), DyDiT)
    complete = sampling_model(dydit, complete_model=True, complete_from_t=300)
    assert isinstance(complete, CompleteModel) and complete.from_t == 300
    schedule = sampling_model(strategy_checkpoints / "FlexiDiT-lab-L-adapters.pt", steps=10, coarse_steps=4)
    assert isinstance(schedule, PatchSchedule) and (schedule.coarse_steps, schedule.total_steps) == (4, 10)
    with pytest.raises(ValueError, match="--complete-model"):
        sampling_model(dydit, complete_from_t=300)


def test_count_flops_report_of_a_lab_preset():
    r = count_flops_report("DiT-lab-T")
    assert r["macs"] == analytic_flops("DiT-lab-T")["total"] and r["gflops_fvcore"] == r["gflops"]
    assert r["arch"] == "DiT-lab-T" and r["tokens"] == 16

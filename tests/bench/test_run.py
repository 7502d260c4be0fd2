"""The speed benchmark's run (dydit_lab.bench.run): the result record, sweeps, argument checks.
No timing asserts."""

import json
import math
from datetime import datetime

import pytest
import torch

from dydit_lab.bench import run as bench
from dydit_lab.bench.workload import build_models
from dydit_lab.memory import freed_memory_kept
from dydit_lab.models import conditioning
from dydit_lab.paths import resolve_device
from tests.helpers import BENCH_ARCH as ARCH, BENCH_BATCH as BATCH, BENCH_RESULT_KEYS as REQUIRED_KEYS
from tests.helpers import BENCH_STEPS as STEPS


@pytest.fixture(scope="module")
def result(models):
    return bench.run_benchmark(ARCH, target_ratio=0.5, batch_size=BATCH, steps=STEPS, repeats=1,
                               device="cpu", models=models)


def test_result_has_all_keys_and_sane_values(result, models):
    assert REQUIRED_KEYS <= set(result)
    json.loads(json.dumps(result))  # JSON-ready
    assert result["arch"] == ARCH and result["device"] == "cpu"
    assert (result["batch_size"], result["steps"], result["input_size"]) == (BATCH, STEPS, 32)
    assert abs(result["flops_ratio"] - 0.5) <= 0.02
    for key in ("static_seconds", "dynamic_seconds", "masked_seconds"):
        assert result[key] > 0 and math.isfinite(result[key])
    assert result["speedup"] == pytest.approx(result["static_seconds"] / result["dynamic_seconds"])
    assert result["masked_speedup"] == pytest.approx(result["static_seconds"] / result["masked_seconds"])
    assert result["ideal_speedup"] == pytest.approx(1 / result["flops_ratio"])
    assert result["efficiency"] == pytest.approx(result["speedup"] / result["ideal_speedup"])
    assert 0 < result["token_keep_rate"] < 1
    assert 0 < result["head_fraction"] < 1 and 0 < result["group_fraction"] < 1
    per_step = result["flops_ratio_per_step"]
    assert len(per_step) == STEPS and sum(per_step) / STEPS == pytest.approx(result["flops_ratio"])
    assert per_step == sorted(per_step)  # cheapest at the noisiest step (listed first)
    assert result["routing_agree"] and result["max_abs_diff_sliced_masked"] < 1e-4
    assert result["token_decisions_flipped"] == 0
    assert result["token_decisions"] == STEPS * result["batch_size"] * len(models[0].blocks) * result["tokens"]
    assert result["torch_version"] == torch.__version__ and result["num_threads"] >= 1
    assert result["conditioning_planned"] is True
    datetime.fromisoformat(result["timestamp"])


def test_bad_arch_device_and_arguments_raise(models):
    with pytest.raises(ValueError, match="unknown arch"):
        bench.run_benchmark("DiT-XXL/2", device="cpu")
    with pytest.raises(ValueError, match="unknown arch"):
        build_models("nope")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark(ARCH, repeats=0, device="cpu", models=models)
    with pytest.raises(ValueError):
        bench.parse_batch_list("1,x")
    with pytest.raises(ValueError):
        bench.parse_batch_list("0,2")
    assert bench.parse_batch_list("1, 2,4") == [1, 2, 4]


def test_sweep_rows_csv_and_name(models, tmp_path):
    rows = bench.run_sweep(ARCH, [1, 2], target_ratio=0.6, steps=STEPS, repeats=1, device="cpu", verbose=False)
    assert [r["batch_size"] for r in rows] == [1, 2] and REQUIRED_KEYS <= set(rows[0])
    path = bench.write_csv(rows, tmp_path / "sweeps" / "s.csv")
    text = path.read_text().splitlines()
    assert len(text) == 3 and "batch_size" in text[0]
    assert bench.sweep_name(ARCH, "cpu", 0.6) == "cpu_lab_t_r0.6_sweep"
    assert bench.sweep_name("DiT-XL/2", "cuda", 0.5) == "cuda_xl2_r0.5_sweep"


def test_paths_are_interleaved_at_every_step_in_a_rotating_order(models, inputs):
    dit, dydit = models
    calls = []
    hooks = [dit.register_forward_pre_hook(lambda *_: calls.append("static")),
             dydit.register_forward_pre_hook(lambda m, _: calls.append(m.execution))]
    try:
        timing = bench.time_paths(dit, dydit, inputs, repeats=2, device=torch.device("cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    steps = len(inputs.x)
    timed = calls[3 * steps:]  # after one warm-up pass per path
    assert len(timed) == 2 * 3 * steps
    firsts = [timed[3 * i] for i in range(2 * steps)]
    for i in range(0, len(timed), 3):
        assert sorted(timed[i:i + 3]) == ["masked", "sliced", "static"]  # each step: every path once
    assert len(set(firsts[:3])) == min(3, steps)  # the leading path rotates from step to step
    assert {k: len(v) for k, v in timing["times"].items()} == {"static": 2, "sliced": 2, "masked": 2}
    assert set(timing["faults"]) == {"static", "sliced", "masked"} and all(n >= 0 for n in timing["faults"].values())
    assert all(len(v) == steps for v in timing["outputs"].values())
    for name, passes in timing["step_seconds"].items():  # every timed forward, per pass and step
        assert len(passes) == 2 and all(len(p) == steps for p in passes)
        assert [sum(p) for p in passes] == pytest.approx(timing["times"][name])


@pytest.mark.parametrize("planned", [True, False])
def test_every_pass_plans_its_conditioning_in_its_first_timed_step(models, inputs, planned, monkeypatch):
    dit, dydit = models
    plans, lookups = [], []
    make_plan, lookup = conditioning.make_plan, conditioning.lookup
    monkeypatch.setattr(conditioning, "make_plan", lambda *a: plans.append(a[0]) or make_plan(*a))
    monkeypatch.setattr(conditioning, "lookup", lambda *a: lookups.append(lookup(*a)) or lookups[-1])
    bench.time_paths(dit, dydit, inputs, repeats=2, device=torch.device("cpu"), plan_conditioning=planned)
    passes = 3 * (1 + 2)  # three paths, a warm-up and two timed passes each
    assert plans == ([dit, dydit, dydit] * 3 if planned else [])  # the first step's rotation: static first
    assert len(lookups) == passes * len(inputs.x)
    assert all((m is not None) == planned for m in lookups)
    assert dit._conditioning is None and dydit._conditioning is None  # dropped after the bench


def test_pass_spread_is_the_static_passes_range_over_their_median(result):
    assert bench.pass_spread([1.0, 1.2, 0.9]) == pytest.approx(0.3)
    assert bench.pass_spread([2.0]) == 0
    assert result["static_pass_spread"] == 0  # repeats=1: one pass per path
    steps = {"static": [[0.5, 0.5], [0.4, 0.8], [0.6, 0.3]], "sliced": [[0.2, 0.3], [0.3, 0.3], [0.3, 0.2]],
             "masked": [[0.5, 0.6], [0.5, 0.5], [0.6, 0.6]]}
    fields = bench.pass_fields({"times": {"static": [1.0, 1.2, 0.9], "sliced": [0.5, 0.6, 0.5], "masked": [1.1, 1.0, 1.2]},
                                "step_seconds": steps, "faults": {"static": 4.0, "sliced": 0.0, "masked": 2.5}}, 0.5)
    assert fields["static_pass_spread"] == pytest.approx(0.3) and fields["dynamic_pass_seconds"] == [0.5, 0.6, 0.5]
    assert fields["masked_pass_seconds"] == [1.1, 1.0, 1.2] and fields["static_pass_seconds"] == [1.0, 1.2, 0.9]
    assert (fields["static_faults_per_pass"], fields["dynamic_faults_per_pass"], fields["masked_faults_per_pass"]) == (4, 0, 2.5)
    assert fields["freed_memory_kept"] is freed_memory_kept()
    # best pass: each step's fastest forward, summed (static 0.4 + 0.3, sliced 0.2 + 0.2, masked 0.5 + 0.5)
    assert (fields["static_best_pass_seconds"], fields["dynamic_best_pass_seconds"],
            fields["masked_best_pass_seconds"]) == pytest.approx((0.7, 0.4, 1.0))
    assert fields["best_pass_speedup"] == pytest.approx(1.75) and fields["best_pass_efficiency"] == pytest.approx(0.875)
    assert fields["best_pass_masked_speedup"] == pytest.approx(0.7)


def test_best_pass_sums_each_steps_fastest_forward():
    assert bench.best_pass([[1.0, 2.0, 3.0]]) == 6.0  # one pass: itself
    assert bench.best_pass([[1.0, 2.5], [1.5, 2.0], [1.2, 9.0]]) == pytest.approx(3.0)  # min per step, not per pass
    for bad in ([], [[1.0, 2.0], [1.0]]):
        with pytest.raises(ValueError, match="same number of steps"):
            bench.best_pass(bad)


def test_noise_warnings_name_the_rows_a_noisy_machine_leaves_unresolved(capsys):
    quiet = {"arch": "DiT-XL/2", "batch_size": 1, "static_pass_spread": 0.02, "efficiency_runs": [0.95, 0.97, 0.96]}
    spread = {**quiet, "batch_size": 4, "static_pass_spread": 0.13}
    runs = {"name": "DyDiT-lab-L-0.5", "batch_size": 100, "static_pass_spread": 0.01,
            "efficiency_runs": [0.80, 0.87, 1.03]}
    assert bench.noise_warnings([quiet, {"arch": "DiT-S/2", "batch_size": 2}]) == []  # no spread recorded: no claim
    lines = bench.noise_warnings([quiet, spread, runs])
    assert lines == ["DiT-XL/2, batch 4: the static passes (identical work) spread 13%",
                     "DyDiT-lab-L-0.5, batch 100: the 3 runs read 0.800-1.030 of the ideal"]
    rows = [quiet, spread]
    assert bench.warn_noise(rows) is rows
    err = capsys.readouterr().err
    assert "too noisy" in err and "batch 4" in err and "batch 1:" not in err
    bench.warn_noise([quiet])
    assert capsys.readouterr().err == ""


def test_median_of_runs_keeps_the_median_run_whole_and_every_runs_speedup():
    def row(batch, speedup, tag):
        return {"batch_size": batch, "speedup": speedup, "efficiency": speedup / 2, "static_seconds": tag,
                "best_pass_efficiency": speedup / 1.8, "best_pass_masked_speedup": 1.0}
    runs = [[row(1, 1.9, "a1"), row(4, 2.1, "a4")],
            [row(1, 1.7, "b1"), row(4, 1.8, "b4")],
            [row(1, 2.0, "c1"), row(4, 1.9, "c4")]]
    rows = bench.median_of_runs(runs)
    assert [r["static_seconds"] for r in rows] == ["a1", "c4"]  # every number from the median run
    assert rows[0]["runs"] == 3 and rows[0]["speedup_runs"] == [1.9, 1.7, 2.0]
    assert rows[1]["efficiency_runs"] == [1.05, 0.9, 0.95]
    assert rows[1]["best_pass_efficiency_runs"] == pytest.approx([2.1 / 1.8, 1.0, 1.9 / 1.8])
    assert rows[1]["best_pass_efficiency_median"] == pytest.approx(1.9 / 1.8)  # its own median, of every run
    assert rows[0]["best_pass_masked_speedup_median"] == 1.0
    old = [{k: v for k, v in r.items() if not k.startswith("best_pass")} for r in runs[0]]
    assert "best_pass_efficiency_runs" not in bench.median_of_runs([old])[0]  # rows of an older bench
    assert [r["static_seconds"] for r in bench.median_of_runs(runs[:2])] == ["b1", "b4"]  # lower median
    assert bench.median_of_runs(runs[:1])[0]["runs"] == 1
    with pytest.raises(ValueError, match="same batch sizes"):
        bench.median_of_runs([runs[0], runs[1][:1]])
    with pytest.raises(ValueError, match="differ in batch sizes"):
        bench.median_of_runs([runs[0], runs[1][::-1]])
    with pytest.raises(ValueError, match="one or more runs"):
        bench.median_of_runs([])

"""The speed benchmark (dydit_lab.bench): router setting, result record, CLI. No timing asserts."""

import csv
import json
import math
from datetime import datetime

import pytest
import torch

from dydit_lab import bench
from dydit_lab.cli import main

ARCH = "DiT-lab-T"  # depth 2, 4 heads, 16 tokens: the router search has coarse steps here
STEPS, BATCH = 4, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one thread avoids waiting on a busy second core at every op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return bench.build_models(ARCH, input_size=32, device="cpu", seed=0)


@pytest.fixture(scope="module")
def inputs(models):
    return bench.make_inputs(models[0], BATCH, STEPS, seed=0)


@torch.no_grad()
def _routings(dydit, inputs, execution="sliced"):
    dydit.execution = execution
    runs = [dydit(x, t, inputs.y, return_routing=True) for x, t in zip(inputs.x, inputs.t)]
    dydit.execution = "sliced"
    return runs


def test_inputs_follow_a_respaced_process(inputs):
    assert inputs.timesteps == [999, 666, 333, 0]  # sampling order, noisiest first
    assert len(inputs.x) == STEPS and inputs.x[0].shape == (BATCH, 1, 32, 32)
    assert all(torch.equal(t, torch.full((BATCH,), ts)) for t, ts in zip(inputs.t, inputs.timesteps))
    # the noisiest input is (nearly) pure noise, the cleanest (nearly) the smooth latent
    assert abs(float(inputs.x[0].std()) - 1.0) < 0.3


def test_models_share_weights_and_are_not_trivial(models, inputs):
    dit, dydit = models
    with torch.no_grad():
        out = dit(inputs.x[1], inputs.t[1], inputs.y)
        full = dydit(inputs.x[1], inputs.t[1], inputs.y, complete_model=True)
    assert out.abs().mean() > 1e-3  # adaLN-Zero layers were given random weights
    torch.testing.assert_close(out, full)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_router_setting_hits_target(models, inputs, target):
    _, dydit = models
    setting = bench.set_routers(dydit, inputs, target)
    assert abs(setting.flops_ratio - target) <= 0.02
    runs = _routings(dydit, inputs)
    per_step = [float(r.flops_fraction(dydit.config).mean()) for _, r in runs]
    assert abs(sum(per_step) / STEPS - target) <= bench.TOLERANCE  # the routing a run really uses
    # width shrinks toward noisy timesteps (runs are in sampling order: t = 999 first)
    width = [float(r.heads.mean() + r.groups.mean()) for _, r in runs]
    assert all(a <= b for a, b in zip(width, width[1:]))
    assert width[0] < width[-1]
    # both mechanisms are exercised: some tokens skip the MLP, some heads are off
    keep = float(torch.stack([r.tokens.mean() for _, r in runs]).mean())
    assert 0.5 < keep < 1.0
    assert float(runs[0][1].heads.mean()) < 1.0
    # head 0 and group 0 are always on
    assert all(bool(r.heads[..., 0].all() and r.groups[..., 0].all()) for _, r in runs)


def test_router_setting_is_deterministic(models, inputs):
    _, dydit = models
    a = bench.set_routers(dydit, inputs, 0.6)
    state = {k: v.clone() for k, v in dydit.state_dict().items()}
    b = bench.set_routers(dydit, inputs, 0.6)
    assert a == b
    assert all(torch.equal(state[k], v) for k, v in dydit.state_dict().items())


def test_noise_level_fit_is_monotone_on_sampled_steps(models, inputs):
    _, dydit = models
    w, b, err = bench.fit_noise_level(dydit, inputs.timesteps)
    assert err < 0.05
    with torch.no_grad():
        s = dydit.t_embedder(torch.tensor(sorted(inputs.timesteps))).double() @ w + b
    assert bool((s[1:] > s[:-1]).all())


def test_sliced_and_masked_agree_on_bench_model(models, inputs):
    _, dydit = models
    bench.set_routers(dydit, inputs, 0.5)
    sliced, masked = _routings(dydit, inputs, "sliced"), _routings(dydit, inputs, "masked")
    for (a, ra), (b, rb) in zip(sliced, masked):
        assert torch.equal(ra.heads, rb.heads) and torch.equal(ra.groups, rb.groups)
        assert torch.equal(ra.tokens, rb.tokens)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


REQUIRED_KEYS = {
    "arch", "input_size", "device", "batch_size", "steps", "target_ratio", "flops_ratio",
    "static_seconds", "dynamic_seconds", "masked_seconds", "speedup", "masked_speedup",
    "ideal_speedup", "efficiency", "token_keep_rate", "head_fraction", "group_fraction",
    "flops_ratio_per_step", "torch_version", "num_threads", "timestamp",
}


@pytest.fixture(scope="module")
def result(models):
    return bench.run_benchmark(ARCH, target_ratio=0.5, batch_size=BATCH, steps=STEPS, repeats=1,
                               device="cpu", models=models)


def test_result_has_all_keys_and_sane_values(result):
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
    assert result["torch_version"] == torch.__version__ and result["num_threads"] >= 1
    datetime.fromisoformat(result["timestamp"])


@pytest.mark.parametrize("target", [1.2, 0.01, -0.5, float("nan")])
def test_unreachable_targets_raise(models, inputs, target):
    with pytest.raises(ValueError, match="cannot be reached"):
        bench.set_routers(models[1], inputs, target)
    with pytest.raises(ValueError, match="cannot be reached"):
        bench.run_benchmark(ARCH, target_ratio=target, device="cpu", models=models)


def test_floor_is_reachable_and_bounds_are_ordered(models, inputs):
    floor, full = bench.flops_bounds(models[1].config)
    assert 0 < floor < 0.5 < 1 < full < 1.01  # all-on costs a little more: the routers
    bench.check_target(models[1].config, floor)
    with pytest.raises(ValueError):
        bench.check_target(models[1].config, floor - 1e-3)


def test_bad_arch_device_and_arguments_raise(models):
    with pytest.raises(ValueError, match="unknown arch"):
        bench.run_benchmark("DiT-XXL/2", device="cpu")
    with pytest.raises(ValueError, match="unknown arch"):
        bench.build_models("nope")
    with pytest.raises(ValueError):
        bench.resolve_device("tpu")
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark(ARCH, repeats=0, device="cpu", models=models)
    with pytest.raises(ValueError):
        bench.parse_batch_list("1,x")
    with pytest.raises(ValueError):
        bench.parse_batch_list("0,2")
    assert bench.parse_batch_list("1, 2,4") == [1, 2, 4]


def test_other_tiny_arch_hits_target():
    dit, dydit = bench.build_models("DiT-S/8", input_size=16)
    inputs = bench.make_inputs(dit, BATCH, STEPS)
    setting = bench.set_routers(dydit, inputs, 0.5)
    assert abs(setting.flops_ratio - 0.5) <= 0.02
    assert setting.per_step == sorted(setting.per_step)


def test_cli_json_and_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    main(["bench", "--arch", ARCH, "--target-ratio", "0.6", "--repeats", "1", "--device", "cpu",
          "--json", str(out), "--quiet"])
    record = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(record) and abs(record["flops_ratio"] - 0.6) <= 0.02
    assert json.loads(capsys.readouterr().out) == record  # also printed

    main(["bench", "--arch", ARCH, "--sweep-batch", "1,3", "--repeats", "1", "--device", "cpu",
          "--name", "tiny", "--quiet"])
    with open(tmp_path / "data" / "bench" / "tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch_size"]) for r in rows] == [1, 3]
    assert REQUIRED_KEYS <= set(rows[0])
    assert len(json.loads(rows[0]["flops_ratio_per_step"])) == 4


def test_cli_rejects_bad_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--arch", ARCH, "--target-ratio", "1.5", "--device", "cpu", "--quiet"])
    assert exit_info.value.code == 2
    assert "cannot be reached" in capsys.readouterr().err

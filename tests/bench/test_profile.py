"""The profile of the benchmark's paths (dydit_lab.bench.profile): op categories, shares, text."""

import pytest
import torch

from dydit_lab.analysis.routing import trace_sampling
from dydit_lab.bench.profile import (category, describe_profile, profile_checkpoint, profile_pass, profile_paths,
                                     run_profile)
from dydit_lab.bench.router_setting import set_routers
from dydit_lab.cli import main
from tests.helpers import BENCH_ARCH, cli_error, random_dydit, tiny_model


@pytest.mark.parametrize("op, expected", [
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::scaled_dot_product_attention", "attention"),
    ("aten::index_select", "token gather/scatter"), ("aten::index_add_", "token gather/scatter"),
    ("aten::layer_norm", "norm and elementwise"), ("aten::empty", "other")])
def test_ops_fall_into_their_category(op, expected):
    assert category(op) == expected


def test_profile_of_both_paths_adds_up(models, inputs):
    dit, dydit = models
    set_routers(dydit, inputs, 0.5)
    result = profile_paths(dit, dydit, inputs, dit.x_embedder.proj.weight.device, top=5)
    for path in ("static", "sliced"):
        part = result[path]
        assert part["self_ms"] > 0 and sum(part["categories"].values()) == pytest.approx(1.0)
        assert part["categories"]["matmul"] > 0 and len(part["top_ops"]) == 5
        shares = [op["share"] for op in part["top_ops"]]
        assert shares == sorted(shares, reverse=True) and all(op["calls"] > 0 for op in part["top_ops"])
    # Only the sliced path gathers the kept tokens.
    assert result["sliced"]["categories"].get("token gather/scatter", 0) > 0


def test_every_step_is_warmed_up_before_the_profile(inputs):
    # Each step has its own widths; slicing them is a once-per-run cost that must stay out of the profile.
    seen = []
    profile_pass(lambda x, t, y: seen.append(int(t[0])), inputs, torch.device("cpu"), top=1)
    steps = [int(t[0]) for t in inputs.t]
    assert seen == steps + steps


def test_run_profile_describes_itself():
    result = run_profile(BENCH_ARCH, batch_size=2, steps=2, device="cpu", threads=1, top=3)
    text = describe_profile(result)
    assert text.splitlines()[0].startswith(f"{BENCH_ARCH}, batch 2, 2 steps, target 0.5, 1 thread(s)")
    assert "static:" in text and "sliced:" in text and "matmul" in text


def test_bench_profile_command_prints_both_paths(capsys):
    main(["bench", "--arch", BENCH_ARCH, "--batch-size", "2", "--steps", "2", "--threads", "1",
          "--device", "cpu", "--profile", "--json", "/dev/null"])
    out = capsys.readouterr().out
    assert out.startswith(f"{BENCH_ARCH}, batch 2, 2 steps") and "sliced:" in out


def test_a_trained_dydit_is_profiled_on_its_own_sampling_run():
    model = random_dydit(0)
    result = profile_checkpoint(model, batch_size=3, steps=3, device="cpu", threads=1, top=4, name="mine")
    trace = trace_sampling(model, [0, 1, 2], steps=3, progress=False)
    assert result["flops_fraction"] == pytest.approx(trace.mean_flops_fraction, rel=1e-6)
    assert result["static"]["self_ms"] > 0 and result["sliced"]["self_ms"] > 0
    assert describe_profile(result).startswith(f"mine, batch 3, 3 steps, FLOPs fraction {trace.mean_flops_fraction:.3f}")
    with pytest.raises(ValueError, match="needs a DyDiT"):
        profile_checkpoint(tiny_model(), steps=2)
    with pytest.raises(ValueError, match="must be positive"):
        profile_checkpoint(model, batch_size=0)


def test_bench_profiles_a_checkpoint_file(tmp_path, capsys):
    path = tmp_path / "dydit.pt"
    torch.save({"ema": random_dydit(0).state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    main(["bench", "--checkpoint", str(path), "--batch-size", "2", "--steps", "2", "--threads", "1",
          "--device", "cpu", "--profile"])
    out = capsys.readouterr().out
    assert out.startswith("dydit, batch 2, 2 steps, FLOPs fraction") and "sliced:" in out
    assert "one pass" in cli_error(capsys, ["bench", "--checkpoint", str(path), "--sweep-batch", "1,2", "--profile"])

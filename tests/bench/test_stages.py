"""The wall-clock stage breakdown (dydit_lab.bench.stages): stages timed where they run,
ideal per stage from the routing, clocks removed afterwards, CLI."""

import time

import pytest
import torch

from dydit_lab.bench.profile import describe_profile, profile_checkpoint, profile_paths, run_profile
from dydit_lab.bench.router_setting import set_routers
from dydit_lab.bench.stages import STAGE_SCALING, describe_stages, stage_breakdown, stage_clocks
from dydit_lab.cli import main
from dydit_lab.models.dydit_block import DyDiTBlock
from tests.helpers import BENCH_ARCH, random_dydit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def breakdown(models, inputs):
    dit, dydit = models
    set_routers(dydit, inputs, 0.5)
    return stage_breakdown(dit, dydit, inputs, CPU, repeats=2)


def test_every_stage_is_reported_with_its_ideal(breakdown):
    rows = {row["stage"]: row for row in breakdown["stages"]}
    assert list(rows) == list(STAGE_SCALING)
    fractions = breakdown["fractions"]
    for row in rows.values():
        assert row["static_ms"] >= 0 and row["sliced_ms"] >= 0
        assert row["ideal_ms"] == pytest.approx(row["static_ms"] * fractions[row["scales_with"]])
    # Only the sliced path routes tokens and plans widths; both paths run the rest.
    for stage in ("token routing", "width plan"):
        assert rows[stage]["static_ms"] == 0 and rows[stage]["sliced_ms"] > 0 and rows[stage]["ideal_ms"] == 0
    for stage in ("embedding", "adaLN modulation", "norm1 + modulate", "attention", "norm2 + modulate", "MLP",
                  "MLP residual", "final layer"):
        assert rows[stage]["static_ms"] > 0 and rows[stage]["sliced_ms"] > 0


def test_stages_add_up_to_the_measured_pass(breakdown):
    rows = breakdown["stages"]
    assert sum(r["static_ms"] for r in rows) == pytest.approx(breakdown["static_ms"])
    assert sum(r["sliced_ms"] for r in rows) == pytest.approx(breakdown["sliced_ms"])
    assert all(r["static_ms"] >= 0 and r["sliced_ms"] >= 0 for r in rows if r["stage"] == "other")
    assert breakdown["stage_ideal_ms"] == pytest.approx(sum(r["ideal_ms"] for r in rows))
    # FLOPs-ideal efficiency = what exact per-stage shrinking allows x how close the pass comes to it.
    assert breakdown["efficiency"] == pytest.approx(breakdown["stage_ceiling"] * breakdown["of_stage_ideal"])
    assert breakdown["masked_ms"] > 0  # timed in the same passes, as the bench times it


def test_the_breakdown_times_the_bench_passes(models, inputs):
    # One timing loop: the clocks observe time_paths, warm-up excluded (reset), all three paths run.
    dit, dydit = models
    set_routers(dydit, inputs, 0.5)
    calls = []
    hook = dydit.register_forward_pre_hook(lambda m, _: calls.append(m.execution))
    try:
        stage_breakdown(dit, dydit, inputs, CPU, repeats=1)
    finally:
        hook.remove()
    assert sorted(set(calls)) == ["masked", "sliced"] and len(calls) == 2 * 2 * len(inputs.x)


def test_fractions_are_those_of_the_sliced_routing(models, inputs, breakdown):
    _, dydit = models
    dydit.execution = "sliced"
    with torch.no_grad():
        routings = [dydit(x, t, inputs.y, return_routing=True)[1] for x, t in zip(inputs.x, inputs.t)]
    heads = torch.cat([r.heads.flatten() for r in routings]).mean()
    tokens = torch.cat([r.tokens.flatten() for r in routings]).mean()
    assert breakdown["fractions"]["heads"] == pytest.approx(float(heads), rel=1e-5)
    assert breakdown["fractions"]["tokens"] == pytest.approx(float(tokens), rel=1e-5)
    assert 0 < breakdown["fractions"]["mlp"] <= breakdown["fractions"]["tokens"]
    flops = torch.cat([r.flops_fraction(dydit.config) for r in routings]).mean()
    assert breakdown["flops_fraction"] == pytest.approx(float(flops), rel=1e-5)


def test_time_lands_on_the_stage_that_spends_it(models, inputs, monkeypatch):
    dit, dydit = models
    set_routers(dydit, inputs, 0.5)
    route = DyDiTBlock.route_tokens

    def slow_route(self, x):
        time.sleep(0.005)
        return route(self, x)

    monkeypatch.setattr(DyDiTBlock, "route_tokens", slow_route)
    result = stage_breakdown(dit, dydit, inputs, CPU, repeats=1)
    rows = {row["stage"]: row for row in result["stages"]}
    assert rows["token routing"]["sliced_ms"] >= 5 * len(dydit.blocks)
    assert rows["other"]["sliced_ms"] < 5


def test_clocks_leave_outputs_alone_and_are_removed(models, inputs):
    dit, dydit = models
    x, t = inputs.x[0], inputs.t[0]
    with torch.no_grad():
        before = dydit(x, t, inputs.y), dit(x, t, inputs.y)
        with stage_clocks([dit, dydit], CPU) as clocks:
            assert "modulation" in dydit.blocks[0].__dict__
            during = dydit(x, t, inputs.y), dit(x, t, inputs.y)
        after = dydit(x, t, inputs.y), dit(x, t, inputs.y)
    for a, b, c in zip(before, during, after):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert clocks.totals["static"]["attention"] > 0
    for block in dydit.blocks:
        assert not {"modulation", "route_tokens", "sliced_mlp"} & set(block.__dict__)
        assert "forward" not in block.attn.__dict__ and "forward" not in block.mlp.__dict__
    assert "embed" not in dydit.__dict__ and "forward" not in dydit.final_layer.__dict__


def test_a_checkpoint_is_broken_down_against_its_complete_model():
    # The complete model is the same DyDiT with every gate on: its blocks are clocked once.
    result = profile_checkpoint(random_dydit(0), batch_size=3, steps=3, device="cpu", threads=1,
                                name="mine", kind="stages", repeats=1)
    rows = {row["stage"]: row for row in result["stages"]}
    assert rows["attention"]["static_ms"] > 0 and rows["token routing"]["static_ms"] == 0
    text = describe_profile(result)
    assert text.startswith("mine, batch 3, 3 steps, FLOPs fraction") and "token routing" in text
    assert "of the FLOPs ideal" in text.splitlines()[-1]


def test_describe_stages_is_a_table(breakdown):
    lines = describe_stages(breakdown).splitlines()
    assert lines[0].startswith("routed fractions: heads") and lines[1].split()[:3] == ["stage", "scales", "with"]
    assert len(lines) == 2 + len(STAGE_SCALING) + 2 and lines[-2].startswith("total")


def test_bad_kind_and_repeats_are_refused(models, inputs):
    dit, dydit = models
    with pytest.raises(ValueError, match="profile kind"):
        profile_paths(dit, dydit, inputs, CPU, kind="flame")
    with pytest.raises(ValueError, match="repeats must be positive"):
        stage_breakdown(dit, dydit, inputs, CPU, repeats=0)


def test_bench_profile_stages_command(capsys):
    result = run_profile(BENCH_ARCH, batch_size=2, steps=2, device="cpu", threads=1, kind="stages", repeats=1)
    assert result["kind"] == "stages" and result["target_ratio"] == 0.5
    main(["bench", "--arch", BENCH_ARCH, "--batch-size", "2", "--steps", "2", "--threads", "1",
          "--device", "cpu", "--repeats", "1", "--profile", "stages"])
    out = capsys.readouterr().out
    assert out.startswith(f"{BENCH_ARCH}, batch 2, 2 steps, target 0.5") and "stage ideal" in out
    with pytest.raises(SystemExit):
        main(["bench", "--arch", BENCH_ARCH, "--profile", "flame"])
    assert "invalid choice: 'flame'" in capsys.readouterr().err


@pytest.mark.cuda
def test_stages_on_cuda_wait_for_their_kernels():
    # Each stage synchronises, so a stage's time includes its kernels rather than their launch.
    result = run_profile(BENCH_ARCH, batch_size=2, steps=2, device="cuda", kind="stages", repeats=1)
    rows = {row["stage"]: row for row in result["stages"]}
    assert result["device"].startswith("cuda") and rows["attention"]["sliced_ms"] > 0
    assert sum(r["sliced_ms"] for r in result["stages"]) == pytest.approx(result["sliced_ms"])

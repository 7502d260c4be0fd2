"""Routing traces of DyDiT sampling runs and learned width schedules."""

import pytest
import torch

from dydit_lab.analysis.routing import (RoutingTrace, WidthSchedule, describe_models, load_dydits, trace_sampling,
                                        width_schedule, width_summary)
from dydit_lab.diffusion import GaussianDiffusion
from dydit_lab.models import DyDiT, get_config
from dydit_lab.models.dydit import RoutingRecorder, sampling_flops
from tests.helpers import random_dydit


def test_trace_shapes_and_consistency(traces):
    trace = traces["model 0"]
    assert trace.timesteps == [999, 749, 500, 250, 0]
    assert trace.heads.shape == (5, 3, 2, 4) and trace.tokens.shape == (5, 3, 2, 16)
    assert trace.x_t.shape == (5, 3, 1, 32, 32) and trace.samples.shape == (3, 1, 32, 32)
    # TDW depends on t only: every sample at a step has the same width.
    assert (trace.heads == trace.heads[:, :1]).all()
    assert 0 < trace.mean_flops_fraction < 1
    assert trace.token_grid(0, 0, 0).shape == (4, 4)


def test_trace_widths_agree_with_the_sampling_count(traces):
    """TDW depends on t only: the FLOPs count's run (other labels) sees the trace's widths."""
    trace = traces["model 0"]
    assert isinstance(trace, RoutingTrace) and trace.name == "model 0"
    run = sampling_flops(random_dydit(0), steps=5, num_samples=3, progress=False)
    assert run["per_step_timesteps"] == trace.timesteps
    heads = trace.heads.float().mean(dim=(1, 2, 3))
    assert torch.allclose(torch.tensor(run["per_step_heads"]), heads)
    assert torch.allclose(trace.flops_fraction.mean(), torch.tensor(trace.mean_flops_fraction))


def test_trace_sampling_reproduces_from_its_seed():
    a = trace_sampling(random_dydit(2), [4, 5], steps=3, progress=False, seed=1)
    b = trace_sampling(random_dydit(2), [4, 5], steps=3, progress=False, seed=1)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.tokens, b.tokens)


def test_trace_with_guidance_keeps_the_conditional_half():
    """Guided forwards carry 2B rows; the trace keeps the B conditional ones, whose inputs are
    the samples' own x_t, and charges both halves in the FLOPs."""
    model = random_dydit(3)
    guided = trace_sampling(model, [4, 5], steps=3, cfg_scale=3.0, progress=False)
    assert guided.heads.shape[:2] == guided.tokens.shape[:2] == guided.x_t.shape[:2] == (3, 2)
    assert guided.samples.shape == (2, 1, 32, 32) and guided.labels.tolist() == [4, 5]
    recorder = RoutingRecorder(model, keep_inputs=True)
    GaussianDiffusion().respaced(3).sample(recorder, torch.tensor([4, 5]), (2, 1, 32, 32), method="ddim",
                                           cfg_scale=3.0, progress=False)
    assert torch.equal(guided.tokens[1], recorder.records[1].tokens[:2])
    assert torch.equal(guided.x_t[2], recorder.inputs[2][:2])
    both = torch.stack([r.flops_fraction(model.config).mean() for r in recorder.records])
    assert torch.allclose(guided.flops_fraction, both)


def test_a_latent_model_samples_unclipped_latents():
    model = DyDiT(get_config("DiT-lab-T", in_channels=4, input_size=8, num_classes=3)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)  # large outputs: clipping would show
    trace = trace_sampling(model, [0, 2], steps=2, progress=False)
    assert trace.samples.shape == (2, 4, 8, 8) and trace.samples.abs().max() > 1


def test_width_schedule_is_the_width_of_every_sampling_step(traces):
    """TDW reads only t: the routers alone give the widths a sampling run used."""
    model = random_dydit(0)
    schedule = width_schedule(model, name="m")
    assert schedule.name == "m" and schedule.timesteps[0] == 999 and schedule.timesteps[-1] == 0
    assert schedule.heads.shape == (1000, 1, 2, 4) and schedule.groups.shape == (1000, 1, 2, 4)
    trace = traces["model 0"]
    for step, t in enumerate(trace.timesteps):
        assert torch.equal(schedule.heads[999 - t, 0], trace.heads[step, 0])
        assert torch.equal(schedule.groups[999 - t, 0], trace.groups[step, 0])


def test_width_summary_averages_each_range_of_t():
    heads = torch.zeros(1000, 1, 2, 4)
    heads[:500] = 1  # on at the noisy half (timesteps 999..500)
    schedule = WidthSchedule("m", list(range(999, -1, -1)), heads, torch.ones(1000, 1, 2, 4))
    table = width_summary({"m": schedule}, bins=4)
    assert table["t"].tolist() == ["0-249", "250-499", "500-749", "750-999"]
    assert table["heads_active"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert table["groups_active"].tolist() == [1.0] * 4


def test_load_dydits_names_one_file_after_itself(tmp_path, tiny):
    dydit = DyDiT.from_dit(tiny)
    torch.save({"ema": dydit.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "new_dydit0.5.pt")
    torch.save({"ema": tiny.state_dict(), "args": {"arch": "DiT-lab-T"}}, tmp_path / "dit.pt")
    models = load_dydits(tmp_path / "new_dydit0.5.pt")
    assert list(models) == ["new_dydit0.5"] and isinstance(models["new_dydit0.5"], DyDiT)
    assert list(load_dydits({"a": tmp_path / "new_dydit0.5.pt"})) == ["a"]
    with pytest.raises(ValueError, match="holds a DiT, not a DyDiT"):
        load_dydits(str(tmp_path / "dit.pt"))


def test_describe_models_of_the_lab():
    table = describe_models({"m": random_dydit(0)})
    assert table.to_dict("records") == [{"model": "m", "arch": None, "routers": "2025 release",
                                         "parameters_M": table["parameters_M"][0], "input": "1x32x32",
                                         "images": "1x32x32"}]

"""Conditioning planned for a sampling run: the same outputs as computing every step's adaLN
modulation, looked up only where it applies, refilled in windows and after weight updates."""

import pytest
import torch

from dydit_lab.diffusion import GaussianDiffusion, guided
from dydit_lab.models import conditioning
from dydit_lab.models.dydit import RoutingRecorder
from tests.helpers import random_dydit

STEPS = 5


def schedule(steps: int = STEPS) -> list[int]:
    return sorted(GaussianDiffusion().respaced(steps).timestep_map, reverse=True)


def per_step_modulation(model, t: int, y: torch.Tensor) -> list[tuple]:
    with torch.no_grad():
        _, c, _ = model.embed(torch.zeros(len(y), model.in_channels, 32, 32), torch.full((len(y),), t), y)
        return [block.modulation(c) for block in model.blocks]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["dit", "sliced", "masked"])
def test_planned_sampling_equals_per_step_conditioning(tiny, kind, cfg_scale, monkeypatch):
    model = tiny if kind == "dit" else random_dydit()
    if kind != "dit":
        model.execution = kind
    diffusion = GaussianDiffusion().respaced(STEPS)
    y, shape = torch.tensor([0, 3, 7]), (3, 1, 32, 32)
    looked_up = []
    original = conditioning.lookup
    monkeypatch.setattr(conditioning, "lookup", lambda *a: looked_up.append(original(*a)) or looked_up[-1])
    with torch.no_grad():
        planned = diffusion.sample(model, y, shape, method="ddim", cfg_scale=cfg_scale, progress=False)
        assert len(looked_up) == STEPS and all(m is not None for m in looked_up)  # every step planned
        monkeypatch.setattr(conditioning, "make_plan", lambda *a: None)
        plain = diffusion.sample(model, y, shape, method="ddim", cfg_scale=cfg_scale, progress=False)
    assert looked_up[-1] is None  # the second run computed its modulation per step
    assert ((planned - plain).norm() / plain.norm()).item() < 1e-5  # float rounding, over every step


def test_the_plan_holds_each_steps_modulation_and_is_dropped_after_the_run(tiny):
    y = torch.tensor([1, 2])
    seen = []
    diffusion = GaussianDiffusion().respaced(STEPS)
    with torch.no_grad():
        diffusion.sample(tiny, y, (2, 1, 32, 32), method="ddim", progress=False,
                         callback=lambda i, t, x: seen.append(tiny._conditioning))
    assert all(plan is not None for plan in seen) and tiny._conditioning is None
    plan = seen[0]
    for t in schedule():
        planned = conditioning.lookup(tiny, plan, torch.full((2,), t), y)
        for block_planned, block_step in zip(planned, per_step_modulation(tiny, t, y)):
            for a, b in zip(block_planned, block_step):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_calls_outside_the_plan_compute_their_own_conditioning(tiny):
    y = torch.tensor([1, 2])
    tiny.plan_conditioning(schedule(), y)
    plan, t0 = tiny._conditioning, schedule()[0]
    assert conditioning.lookup(tiny, plan, torch.full((2,), t0), y.clone()) is not None  # equal labels
    misses = {
        "other labels": (torch.full((2,), t0), torch.tensor([1, 3])),
        "other batch": (torch.full((3,), t0), torch.tensor([1, 2, 3])),
        "mixed timesteps": (torch.tensor([t0, schedule()[1]]), y),
        "unplanned timestep": (torch.full((2,), t0 + 1), y),
    }
    for name, (t, labels) in misses.items():
        assert conditioning.lookup(tiny, plan, t, labels) is None, name
    tiny.train()
    assert conditioning.lookup(tiny, plan, torch.full((2,), t0), y) is None  # training never reads a plan
    tiny.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a missed call is the plain forward
        t = torch.full((2,), t0 + 1)
        out = tiny(x, t, y)
        tiny.plan_conditioning(None)
        assert tiny._conditioning is None
        torch.testing.assert_close(out, tiny(x, t, y), rtol=0, atol=0)


def test_a_weight_update_refills_the_plan(tiny):
    y, t = torch.tensor([4]), schedule()[2]
    tiny.plan_conditioning(schedule(), y)
    with torch.no_grad():
        tiny.blocks[0].adaLN_modulation[-1].weight.add_(0.5)
    planned = conditioning.lookup(tiny, tiny._conditioning, torch.full((1,), t), y)
    torch.testing.assert_close(planned[0][0], per_step_modulation(tiny, t, y)[0][0], rtol=1e-5, atol=1e-7)


def test_long_runs_are_planned_in_windows_within_the_memory_cap(tiny, monkeypatch):
    y = torch.tensor([0, 1])
    weight = tiny.blocks[0].adaLN_modulation[-1].weight
    per_step = len(y) * len(tiny.blocks) * weight.shape[0] * weight.element_size()
    monkeypatch.setattr(conditioning, "PLAN_MEMORY_BYTES", 4 * per_step)
    tiny.plan_conditioning(schedule(), y)
    plan = tiny._conditioning
    assert plan.window == 4 and list(plan.steps) == schedule()[:4]
    assert plan.modulation[0].shape == (4, len(y), weight.shape[0])
    last = schedule()[-1]
    planned = conditioning.lookup(tiny, plan, torch.full((2,), last), y)
    assert list(plan.steps) == [last]  # the window that starts at that step (the schedule's end)
    torch.testing.assert_close(planned[1][5], per_step_modulation(tiny, last, y)[1][5], rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(conditioning, "PLAN_MEMORY_BYTES", (conditioning.MIN_PLAN_STEPS - 1) * per_step)
    tiny.plan_conditioning(schedule(), y)
    assert tiny._conditioning is None  # too few steps fit: each step computes its own


def test_short_runs_are_not_planned(tiny):
    tiny.plan_conditioning(schedule(conditioning.MIN_PLAN_STEPS - 1), torch.tensor([0]))
    assert tiny._conditioning is None
    tiny.plan_conditioning(schedule(conditioning.MIN_PLAN_STEPS), torch.tensor([0]))
    assert tiny._conditioning is not None
    tiny.plan_conditioning(schedule(), torch.tensor([], dtype=torch.long))  # no labels: nothing to plan
    assert tiny._conditioning is None


def test_guidance_calls_the_model_with_one_label_tensor_per_run(tiny):
    fn = guided(tiny, 2.0)
    y = torch.tensor([5, 6])
    assert fn.labels(y) is fn.labels(y)
    assert fn.labels(y).tolist() == [5, 6, tiny.num_classes, tiny.num_classes]


def test_wrappers_pass_the_plan_to_the_model_they_wrap():
    model = random_dydit()
    recorder = RoutingRecorder(model)
    recorder.plan_conditioning(schedule(), torch.tensor([1]))
    assert model._conditioning is not None
    recorder.plan_conditioning(None)
    assert model._conditioning is None


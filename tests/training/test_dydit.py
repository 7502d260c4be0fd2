"""FLOPs-constrained fine-tuning of a DiT into a DyDiT: schedules, router objective, distillation."""

from pathlib import Path

import pandas as pd
import pytest
import torch

import dydit_lab
from dydit_lab.data import load_dataset
from dydit_lab.diffusion import GaussianDiffusion
from dydit_lab.models.dydit import DyDiT
from dydit_lab.models.routers import Routing
from dydit_lab.training.loop import Batch
from dydit_lab.training.dydit import (PROFILE_BINS, ROUTING_LOG_FIELDS, DyDiTObjective, FinetuneConfig,
                                      distillation_target, finetune, gumbel_noise_at, load_parent, loss_profile,
                                      per_block_routing, relative_weights, target_at)


def test_target_schedule():
    cfg = FinetuneConfig(target_ratio=0.5, hold_steps=100, anneal_steps=1000)
    assert target_at(0, cfg) == 1.0 and target_at(99, cfg) == 1.0
    assert target_at(550, cfg) == pytest.approx(0.75)
    assert target_at(1000, cfg) == 0.5 and target_at(5000, cfg) == 0.5


def test_gumbel_noise_fades_after_the_anneal():
    cfg = FinetuneConfig(steps=1200, anneal_steps=500, noise_off_step=900)
    assert gumbel_noise_at(0, cfg) == 1.0 and gumbel_noise_at(500, cfg) == 1.0
    assert gumbel_noise_at(700, cfg) == pytest.approx(0.5)
    assert gumbel_noise_at(900, cfg) == 0.0 and gumbel_noise_at(1199, cfg) == 0.0
    assert gumbel_noise_at(1199, FinetuneConfig(noise_off_step=0)) == 1.0  # the official constant noise
    with pytest.raises(ValueError, match="noise_off_step"):
        finetune(FinetuneConfig(anneal_steps=500, noise_off_step=400))


def test_relative_weights_equalise_the_loss_across_t():
    profile = torch.tensor([4.0, 2.0, 1.0, 1.0])  # mean 2
    t = torch.tensor([0, 249, 250, 500, 999])
    assert relative_weights(t, profile, 1000).tolist() == [0.5, 0.5, 1.0, 2.0, 2.0]
    # The parent's expected weighted loss is its plain mean loss: same scale as the FLOPs penalty.
    assert (relative_weights(torch.arange(1000), profile, 1000) * profile.repeat_interleave(250)).mean() == 2.0


def test_loss_profile_is_the_complete_models_loss_per_bin():
    dydit = DyDiT.from_dit(dydit_lab.create_model("DiT-lab-T"), sdt_bias=0.1)  # gates would drop tokens
    images, labels = load_dataset("mnist", "val").tensors
    diffusion = GaussianDiffusion(learn_sigma=False)
    profile = loss_profile(dydit, diffusion, images, labels, torch.Generator().manual_seed(0), 16)
    again = loss_profile(dydit, diffusion, images, labels, torch.Generator().manual_seed(0), 16)
    assert profile.shape == (PROFILE_BINS,) and (profile > 0).all() and torch.equal(profile, again)
    assert dydit.training  # restored
    sigma = DyDiT.from_dit(dydit_lab.create_model("DiT-lab-T", learn_sigma=True))  # the official output layout
    profile = loss_profile(sigma, GaussianDiffusion(learn_sigma=True), images, labels,
                           torch.Generator().manual_seed(0), 4)
    assert profile.shape == (PROFILE_BINS,) and (profile > 0).all()


def test_finetune_smoke_moves_flops_toward_target(parent, tmp_path):
    cfg = FinetuneConfig(parent=str(parent), out=str(tmp_path / "ft"), target_ratio=0.5, steps=30,
                         hold_steps=2, anneal_steps=10, noise_off_step=20, batch_size=8, router_lr=0.5,
                         flops_weight=50.0, device="cpu")
    path = finetune(cfg)
    rows = (tmp_path / "ft" / "log.csv").read_text().splitlines()
    assert len(rows) == 31 and "flops_fraction" in rows[0]
    column = rows[0].split(",").index("flops_fraction")
    first, last = (float(r.split(",")[column]) for r in (rows[1], rows[-1]))
    assert first > 0.97 and last < 0.95  # starts (almost) all on; the constraint pulled the routers
    model = dydit_lab.load_model(path)
    assert isinstance(model, DyDiT)
    with pytest.raises(FileExistsError):
        finetune(cfg)
    finetune(FinetuneConfig(**{**cfg.__dict__, "steps": 32, "resume": True}))
    assert len((tmp_path / "ft" / "log.csv").read_text().splitlines()) == 33


def test_routing_log_has_one_row_per_block_and_resumes_cleanly(parent, tmp_path):
    cfg = FinetuneConfig(parent=str(parent), out=str(tmp_path / "ft"), steps=4, hold_steps=0, anneal_steps=1,
                         noise_off_step=0, batch_size=8, routing_log_every=2, device="cpu")
    finetune(cfg)
    depth = dydit_lab.load_model(tmp_path / "ft" / "checkpoint.pt").config.depth
    log = pd.read_csv(tmp_path / "ft" / "routing.csv")
    assert list(log.columns) == ["step", *ROUTING_LOG_FIELDS]
    assert list(log["step"]) == [2] * depth + [4] * depth and list(log["block"]) == list(range(depth)) * 2
    fractions = log.drop(columns=["step", "block"])
    assert ((fractions >= 0) & (fractions <= 1)).all().all()
    assert (log["heads_min"] <= log["heads"]).all() and (log["groups_min"] <= log["groups"]).all()
    # A run killed after logging step 4 but checkpointed at 2 repeats steps 3-4 once, not twice.
    checkpoint = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    checkpoint["step"] = 2
    torch.save(checkpoint, tmp_path / "ft" / "checkpoint.pt")
    finetune(FinetuneConfig(**{**cfg.__dict__, "resume": True}))
    assert list(pd.read_csv(tmp_path / "ft" / "routing.csv")["step"]) == [2] * depth + [4] * depth


def test_per_block_routing_splits_the_batch_by_noise_level():
    heads = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])  # (B=2, depth=2, H=2)
    tokens = torch.tensor([[[1.0, 1.0, 1.0, 1.0]] * 2, [[1.0, 0.0, 0.0, 0.0]] * 2])
    rows = per_block_routing(Routing(heads, heads, tokens, torch.tensor([100, 900])))
    assert [r["block"] for r in rows] == [0, 1]
    assert rows[0]["heads"] == "0.7500" and rows[0]["heads_min"] == "0.5000" and rows[1]["heads_min"] == "0.0000"
    assert rows[0]["tokens_low_t"] == "1.0000" and rows[0]["tokens_high_t"] == "0.2500"
    assert rows[0]["tokens"] == "0.6250"


def test_two_stages_relative_routers_and_noise_fade(parent, tmp_path):
    cfg = FinetuneConfig(parent=str(parent), out=str(tmp_path / "ft"), steps=6, complete_model_steps=4,
                         hold_steps=1, anneal_steps=3, noise_off_step=5, router_objective="relative",
                         batch_size=4, device="cpu")
    finetune(cfg)
    lines = (tmp_path / "ft" / "log.csv").read_text().splitlines()
    column = lines[0].split(",").index("complete_loss")
    complete = [float(line.split(",")[column]) for line in lines[1:]]
    assert all(c > 0 for c in complete[:4]) and complete[4:] == [0.0, 0.0]
    noise = [float(line.split(",")[lines[0].split(",").index("gumbel_noise")]) for line in lines[1:]]
    assert noise == [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]


def test_distillation_target_mixes_noise_and_the_parents_prediction(parent):
    teacher = DyDiT.from_dit(dydit_lab.load_model(parent)).eval()
    diffusion = GaussianDiffusion(learn_sigma=teacher.config.learn_sigma)
    torch.manual_seed(0)
    x_t, noise = torch.randn(2, 2, 1, 32, 32)
    t, y = torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        eps = diffusion.split_output(teacher(x_t, t, y, complete_model=True), 1)[0]
    assert torch.equal(distillation_target(teacher, diffusion, x_t, t, y, noise, 0.0), noise)
    assert torch.allclose(distillation_target(teacher, diffusion, x_t, t, y, noise, 1.0), eps)
    half = distillation_target(teacher, diffusion, x_t, t, y, noise, 0.5)
    assert torch.allclose(half, (noise + eps) / 2, atol=1e-6)


def test_finetune_with_distillation_runs_and_checks_its_weight(parent, tmp_path):
    cfg = FinetuneConfig(parent=str(parent), out=str(tmp_path / "ft"), steps=3, hold_steps=1, anneal_steps=2,
                         noise_off_step=3, distill=1.0, batch_size=4, device="cpu")
    plain = FinetuneConfig(**{**cfg.__dict__, "distill": 0.0, "out": str(tmp_path / "plain")})
    first_losses = []
    for c in (cfg, plain):
        finetune(c)
        rows = (Path(c.out) / "log.csv").read_text().splitlines()
        assert len(rows) == 4
        first_losses.append(float(rows[1].split(",")[1]))
    # Step 1 routes (almost) everything on, so the student is (almost) its teacher.
    assert first_losses[0] < 0.01 * first_losses[1]
    with pytest.raises(ValueError, match="distill"):
        finetune(FinetuneConfig(**{**cfg.__dict__, "distill": 1.5, "out": str(tmp_path / "bad")}))


def test_objective_gives_the_routers_their_own_group_and_lr(parent):
    objective = DyDiTObjective(FinetuneConfig(parent=str(parent), lr=1e-4, router_lr=3e-3))
    model = objective.build(torch.device("cpu"))
    assert isinstance(model, DyDiT)
    weights, routers = objective.param_groups(model)
    assert (weights["lr"], routers["lr"]) == (1e-4, 3e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert routers["params"] and all(any(k in names[id(p)] for k in ("attn_rate.", "mlp_rate.", "token_selection."))
                                     for p in routers["params"])
    assert len(weights["params"]) + len(routers["params"]) == sum(p.requires_grad for p in model.parameters())
    t = objective.timesteps(64, 1000, torch.Generator().manual_seed(0))
    assert torch.bincount(t // 250, minlength=4).tolist() == [16] * 4  # stratified


def test_model_objective_relative_weighs_the_dit_weights_loss_like_the_routers(parent):
    images, labels = load_dataset("mnist", "val").tensors
    diffusion = GaussianDiffusion(learn_sigma=False)
    results = {}
    for model_objective in ("absolute", "relative"):
        objective = DyDiTObjective(FinetuneConfig(parent=str(parent), model_objective=model_objective, batch_size=8))
        model = objective.build(torch.device("cpu"))
        objective.param_groups(model)
        objective.prepare(model, diffusion, images, labels)
        torch.manual_seed(0)
        t = torch.tensor([5, 200, 400, 600, 800, 950, 990, 999])
        batch = Batch(images[:8], labels[:8], t, torch.randn(8, 1, 32, 32), None, step=0)
        outputs = []
        result = objective.loss(lambda *a, **k: outputs.append(model(*a, **k)) or outputs[-1], diffusion, batch)
        mse = diffusion.losses_from_output(outputs[0][0].detach(), batch.x0, None, t, batch.noise)["mse"]
        results[model_objective] = result, mse, relative_weights(t, objective.profile, 1000)
    (absolute, mse, weights), (relative, _, _) = results["absolute"], results["relative"]
    for result, expected in ((absolute, mse.mean()), (relative, (mse * weights).mean())):
        penalty = 2.0 * (result.log["flops_fraction"] - result.log["target"]) ** 2
        assert result.loss.item() == pytest.approx(expected.item() + penalty, rel=1e-4)
    assert absolute.override is not None and relative.override is None  # one objective for both
    assert relative.log["loss"] == pytest.approx(absolute.log["loss"], rel=1e-5)  # the log stays comparable


def test_finetune_config_is_checked(parent):
    for bad, match in [({"target_ratio": 0.0}, "target_ratio"), ({"target_ratio": 1.5}, "target_ratio"),
                       ({"router_objective": "both"}, "router_objective"),
                       ({"model_objective": "x0"}, "model_objective")]:
        with pytest.raises(ValueError, match=match):
            finetune(FinetuneConfig(parent=str(parent), **bad))


def test_a_parent_that_is_no_dit_is_named(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"weights": [1, 2, 3], "note": "not a model"}, junk)
    with pytest.raises(ValueError, match="is not a DiT checkpoint") as err:
        load_parent(junk)
    assert str(junk) in str(err.value)

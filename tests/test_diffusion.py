"""Diffusion process: schedule, respacing, losses, samplers, guidance, seeding."""

import pytest
import torch

import dydit_lab
from dydit_lab.diffusion import GaussianDiffusion, guide_doubled_output, guided, min_snr_weights, space_timesteps


class OracleEps(torch.nn.Module):
    """Predicts the exact noise for data concentrated on one image x0 (learn_sigma optional)."""

    def __init__(self, x0, diffusion, learn_sigma=False):
        super().__init__()
        self.x0, self.base, self.learn_sigma = x0, diffusion, learn_sigma

    def forward(self, x_t, t, y):
        acp = self.base.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x_t - acp.sqrt() * self.x0) / (1 - acp).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def test_linear_schedule_matches_dit():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_space_timesteps():
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


def test_respacing_keeps_marginals():
    base = GaussianDiffusion()
    spaced = base.respaced(50)
    kept = torch.tensor(spaced.timestep_map)
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept])
    assert spaced.model_timesteps(torch.tensor([0, 49])).tolist() == [0, 999]


def test_min_snr_weights():
    d = GaussianDiffusion()
    w = min_snr_weights(d.alphas_cumprod, torch.arange(1000), gamma=5.0)
    assert (w <= 1).all() and w[-1] == 1.0 and w[0] < 0.01


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_losses_vanish_for_the_oracle(learn_sigma):
    d = GaussianDiffusion(learn_sigma=learn_sigma)
    x0 = torch.rand(1, 1, 8, 8) * 2 - 1
    model = OracleEps(x0, d, learn_sigma)
    t = torch.tensor([0, 1, 300, 999])
    losses = d.training_losses(model, x0.expand(4, -1, -1, -1), t, torch.zeros(4, dtype=torch.long))
    assert losses["mse"].max() < 1e-8
    if learn_sigma:
        assert "vb" in losses and torch.isfinite(losses["vb"]).all()
        assert (losses["vb"][1:] >= -1e-6).all()  # a KL divergence


def test_learn_sigma_mismatch_is_explained():
    d = GaussianDiffusion(learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        d.split_output(torch.zeros(1, 2, 4, 4), channels=1)


@pytest.mark.parametrize("method,steps", [("ddim", 10), ("ddim", 1000), ("ddpm", 25)])
def test_samplers_recover_the_single_data_point(method, steps):
    base = GaussianDiffusion()
    x0 = (torch.rand(1, 1, 8, 8) * 2 - 1).clamp(-0.9, 0.9)
    model = OracleEps(x0, base)
    process = base if steps == 1000 else base.respaced(steps)
    out = process.sample(model, torch.zeros(2, dtype=torch.long), (2, 1, 8, 8), method=method,
                         progress=False)
    assert torch.allclose(out, x0.expand(2, -1, -1, -1), atol=2e-3)


def test_sampling_is_seeded():
    model = dydit_lab.create_model("DiT-lab-T").eval()
    d = GaussianDiffusion().respaced(5)
    y = torch.tensor([1, 2])
    a = d.sample(model, y, (2, 1, 32, 32), seed=3, progress=False)
    b = d.sample(model, y, (2, 1, 32, 32), seed=3, progress=False)
    c = d.sample(model, y, (2, 1, 32, 32), seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_sampling_and_callback():
    model = dydit_lab.create_model("DiT-lab-T").eval()
    for prm in model.parameters():
        prm.data.normal_(0, 0.02)
    d = GaussianDiffusion().respaced(4)
    seen = []
    out = d.sample(model, torch.tensor([3, 5]), (2, 1, 32, 32), cfg_scale=2.0, method="ddim",
                   progress=False, callback=lambda i, t, x: seen.append((i, t)))
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    assert seen == [(0, 999), (1, 666), (2, 333), (3, 0)]
    with pytest.raises(ValueError, match="method"):
        d.sample(model, torch.tensor([1]), (1, 1, 32, 32), method="euler")


def test_eps_squared_error_is_per_pixel():
    model = dydit_lab.create_model("DiT-lab-T").eval()
    d = GaussianDiffusion()
    x0, noise = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    t, y = torch.tensor([5, 900]), torch.tensor([0, 1])
    err = d.eps_squared_error(model, x0, t, y, noise)
    assert err.shape == x0.shape
    # A zero-output model (adaLN-Zero init) has error = noise^2.
    assert torch.allclose(err, noise**2)
    mse = d.training_losses(model, x0, t, y, noise)["mse"]
    assert torch.allclose(mse.detach(), err.mean(dim=(1, 2, 3)))


def test_guided_wraps_any_callable():
    calls = []

    def model(x, t, y):  # a plain function: eps = label value, so guidance is visible
        calls.append(y.tolist())
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone()

    x, t, y = torch.zeros(2, 1, 4, 4), torch.tensor([5, 5]), torch.tensor([3, 4])
    assert guided(model, 1.0) is model  # no guidance: the model itself
    out = guided(model, 2.0, null_label=10)(x, t, y)
    assert calls == [[3, 4, 10, 10]]  # one forward: conditional half, then the null label
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([10 + 2 * (3 - 10), 10 + 2 * (4 - 10)]).float())
    with pytest.raises(ValueError, match="null_label"):
        guided(model, 2.0)  # a function has no num_classes


def test_guided_equals_the_official_doubled_batch():
    model = dydit_lab.create_model("DiT-lab-T").eval()
    for prm in model.parameters():
        prm.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([10, 700]), torch.tensor([4, 7])
    with torch.no_grad():
        out = guided(model, 3.0)(x, t, y)  # null label: model.num_classes
        doubled = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))
        assert torch.allclose(out, guide_doubled_output(doubled, 1, 3.0)[:2])
        assert torch.allclose(out, model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                                          torch.cat([y, torch.full_like(y, 10)]), 3.0)[:2])

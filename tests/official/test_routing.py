"""Router schedules of released-format DyDiTs (latent, both router layouts): the width schedule
from the routers alone, a guided latent sampling run decoded by the VAE, token maps over it."""

import pytest
import torch

from dydit_lab.analysis.routing import describe_models, load_dydits, trace_sampling, width_schedule
from dydit_lab.bench.checkpoint import checkpoint_speedup
from dydit_lab.diffusion import GaussianDiffusion
from dydit_lab.official.vae import decode, load_vae
from dydit_lab.viz.routing_plots import plot_token_map


@pytest.mark.parametrize("kind", ["dydit-2025", "dydit-2024"])
def test_a_released_dydit_traced_through_the_vae(kind, released, vae_dir):
    models = load_dydits(released[kind])
    model, vae = models[kind], load_vae(vae_dir)
    table = describe_models(models, vae)
    assert table.loc[0, "arch"] == "DiT-S/4" and table.loc[0, "input"] == "4x8x8"
    assert table.loc[0, "images"] == "3x16x16, VAE-decoded"
    assert table.loc[0, "routers"] == ("2025 release" if kind == "dydit-2025" else "December 2024 release")

    trace = trace_sampling(model, [2, 0], steps=3, cfg_scale=1.5, vae=vae, progress=False, name=kind)
    latents = GaussianDiffusion(learn_sigma=True).respaced(3).sample(
        model, torch.tensor([2, 0]), (2, 4, 8, 8), method="ddim", cfg_scale=1.5, clip_denoised=False,
        progress=False)
    assert torch.allclose(trace.samples, decode(vae, latents), atol=1e-5)  # unclipped latents, decoded
    assert trace.tokens.shape == (3, 2, 12, 4) and trace.heads.shape == (3, 2, 12, 6)
    schedule = width_schedule(model)
    for step, t in enumerate(trace.timesteps):  # TDW: the routers alone give the run's widths
        assert torch.equal(schedule.heads[999 - t, 0], trace.heads[step, 0])

    ax = plot_token_map(trace, step=1, sample=0, layer=5).axes[0]
    image, overlay = ax.get_images()
    assert image.get_array().shape == (16, 16, 3) and overlay.get_array().shape == (16, 16, 4)
    assert "decoded image, class 2" in ax.get_title()


@pytest.mark.cuda
def test_notebook_calls_on_cuda_match_cpu(released, vae_dir):
    """What notebooks 03 and 04 run with device="cuda": the traced run and the timing."""
    cpu, gpu = (load_dydits(released["dydit-2025"], device=d)["dydit-2025"] for d in ("cpu", "cuda"))
    run = dict(labels=[2, 0], steps=3, cfg_scale=1.5, progress=False)
    a = trace_sampling(cpu, vae=load_vae(vae_dir), **run)
    b = trace_sampling(gpu, vae=load_vae(vae_dir, "cuda"), device="cuda", **run)
    assert b.samples.device.type == "cpu" and b.samples.shape == a.samples.shape == (2, 3, 16, 16)
    assert torch.equal(a.heads, b.heads)  # TDW: the same timesteps, strong random routers
    assert (a.tokens == b.tokens).float().mean() > 0.9
    assert (a.samples - b.samples).abs().mean() < 0.05
    record = checkpoint_speedup(gpu, batch_size=2, steps=3, repeats=1, device="cuda")
    assert record["device"].startswith("cuda") and record["speedup"] > 0
    assert record["flops_ratio"] == pytest.approx(
        trace_sampling(gpu, [0, 1], steps=3, device="cuda", progress=False).mean_flops_fraction, rel=1e-6)

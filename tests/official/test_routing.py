"""Router schedules of released-format DyDiTs (latent, both router layouts): the width schedule
from the routers alone, a guided latent sampling run decoded by the VAE, token maps over it."""

import pytest
import torch

from dydit_lab.analysis.routing import describe_models, load_dydits, trace_sampling, width_schedule
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

"""Where the loss sits in the image (DyDiT Figure 1b): patch loss maps and stroke concentration."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dydit_lab.analysis.common import patch_mean
from dydit_lab.analysis.loss_maps import (PatchLossMaps, image_noise, noisy_images, normalize_maps,
                                          patch_loss_maps, stroke_concentration)
from dydit_lab.diffusion import GaussianDiffusion
from tests.helpers import tiny_model




@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 32, 32, generator=gen) * 2 - 1
    return images, torch.arange(5) % 10


def test_patch_mean_matches_unfold():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    manual = F.unfold(x, kernel_size=2, stride=2)  # (N, C*p*p, L)
    manual = manual.mean(dim=1).reshape(2, 2, 2)
    torch.testing.assert_close(patch_mean(x, 2), manual)
    assert patch_mean(x, 2)[0, 0, 0] == pytest.approx(np.mean([0, 1, 4, 5, 16, 17, 20, 21]))


def test_patch_loss_maps_shapes_noise_and_values(batch):
    images, labels = batch
    model = tiny_model()
    ts = [10, 500, 990]
    res = patch_loss_maps(model, images, labels, ts, seed=2, batch_size=4)
    assert isinstance(res, PatchLossMaps)
    assert res.maps.shape == (5, 3, 4, 4) and res.patch_size == 8
    assert res.x_t.shape == (5, 3, 1, 32, 32) and res.timesteps == ts
    torch.testing.assert_close(res.x_t, noisy_images(images, ts, seed=2))
    # the same noise at every timestep: recover it from x_t
    acp = GaussianDiffusion().alphas_cumprod[ts].float().view(1, 3, 1, 1, 1)
    eps = (res.x_t - acp.sqrt() * images[:, None]) / (1 - acp).sqrt()
    torch.testing.assert_close(eps, res.noise[:, None].expand_as(eps), atol=2e-3, rtol=1e-3)
    # maps are the unfold-averaged per-pixel error
    d = GaussianDiffusion()
    for j, t in enumerate(ts):
        err = d.eps_squared_error(model, images, torch.full((5,), t), labels, res.noise)
        manual = F.unfold(err, kernel_size=8, stride=8).mean(dim=1).reshape(5, 4, 4)
        torch.testing.assert_close(res.maps[:, j], manual)


def test_normalize_maps_range_and_constant():
    maps = torch.stack([torch.rand(3, 4, 4) * 5 + 2, torch.full((3, 4, 4), 7.0)])
    out = normalize_maps(maps)
    assert out.shape == maps.shape
    assert torch.allclose(out[0].amin(dim=(-2, -1)), torch.zeros(3))
    assert torch.allclose(out[0].amax(dim=(-2, -1)), torch.ones(3))
    assert (out[1] == 0).all()


def _stroke_case():
    """Two 8x8 images, patch 4: image 0 has ink in patch (0, 0), image 1 in (0, 0) and (1, 1)."""
    images = torch.full((2, 1, 8, 8), -1.0)
    images[0, :, :4, :4] = 1.0
    images[1, :, :4, :4] = 1.0
    images[1, :, 4:, 4:] = 1.0
    stroke = patch_mean(images, 4) > -0.8
    return images, stroke


def test_stroke_concentration_all_loss_on_strokes():
    images, stroke = _stroke_case()
    maps = torch.stack([stroke.float() * 3.0, stroke.float() * 0.5], dim=1)  # (N, T=2, 2, 2)
    out = stroke_concentration(maps, images, 4, timesteps=[100, 900])
    assert list(out.columns) == ["t", "stroke_area_share", "stroke_loss_share", "ratio"]
    assert list(out["t"]) == [100, 900]
    np.testing.assert_allclose(out["stroke_loss_share"], 1.0)
    np.testing.assert_allclose(out["stroke_area_share"], (0.25 + 0.5) / 2)
    np.testing.assert_allclose(out["ratio"], 1.0 / 0.375)


def test_stroke_concentration_uniform_loss_and_result_input(batch):
    images, stroke = _stroke_case()
    maps = torch.ones(2, 1, 2, 2)
    out = stroke_concentration(maps, images, 4)
    np.testing.assert_allclose(out["stroke_loss_share"], 0.375)
    np.testing.assert_allclose(out["ratio"], 1.0)
    res = PatchLossMaps(maps=maps, x_t=torch.zeros(2, 1, 1, 8, 8), noise=torch.zeros(2, 1, 8, 8),
                        timesteps=[7], patch_size=4)
    assert list(stroke_concentration(res, images)["t"]) == [7]


def test_noisy_images_share_one_noise_per_image():
    images = torch.zeros(2, 1, 8, 8)
    x_t = noisy_images(images, [0, 999], seed=5)
    noise = image_noise((2, 1, 8, 8), seed=5)
    acp = GaussianDiffusion().alphas_cumprod[[0, 999]].float()
    for j in range(2):  # zero images: x_t is the scaled noise
        torch.testing.assert_close(x_t[:, j], (1 - acp[j]).sqrt() * noise)
    assert torch.equal(image_noise((2, 1, 8, 8), seed=5), noise)

"""Gaussian diffusion as used by DiT/ADM, in plain torch.

1000-step linear beta schedule (1e-4 -> 0.02), epsilon prediction, optional learned
variance ("learned range") trained with the hybrid loss (MSE + variational bound),
per-sample and per-pixel losses for analysis, DDPM sampling on respaced steps, DDIM,
classifier-free guidance and seeded, reproducible sampling.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

NUM_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced subset of ``num_steps`` timesteps including 0 and T-1 (ADM's rule)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR."""
    acp = alphas_cumprod[t]
    snr = acp / (1 - acp)
    return torch.clamp(snr, max=gamma) / snr


def _extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = arr.to(like.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data in [-1, 1] under a discretised Gaussian (ADM)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class GaussianDiffusion:
    """Diffusion process over ``timesteps`` (a subset of the 1000 base steps when respaced).

    ``learn_sigma`` must match the model: with it, the model's output carries eps and the
    variance interpolation values; without it the variance is fixed ("fixed large", as DiT).
    """

    def __init__(self, learn_sigma: bool = False, timesteps: list[int] | None = None,
                 num_timesteps: int = NUM_TIMESTEPS):
        base_betas = linear_betas(num_timesteps)
        base_acp = np.cumprod(1.0 - base_betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = list(range(num_timesteps)) if timesteps is None else sorted(timesteps)
        # Respacing keeps the marginals q(x_t | x_0) of the kept timesteps.
        betas, last = [], 1.0
        for i in self.timestep_map:
            betas.append(1 - base_acp[i] / last)
            last = base_acp[i]
        betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)

        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
        as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
        self.betas = as_t(betas)
        self.alphas_cumprod = as_t(acp)
        self.alphas_cumprod_prev = as_t(acp_prev)
        self.sqrt_alphas_cumprod = as_t(np.sqrt(acp))
        self.sqrt_one_minus_alphas_cumprod = as_t(np.sqrt(1.0 - acp))
        self.sqrt_recip_alphas_cumprod = as_t(np.sqrt(1.0 / acp))
        self.sqrt_recipm1_alphas_cumprod = as_t(np.sqrt(1.0 / acp - 1))
        self.posterior_variance = as_t(post_var)
        self.posterior_log_variance_clipped = as_t(post_log_var)
        self.posterior_mean_coef1 = as_t(betas * np.sqrt(acp_prev) / (1.0 - acp))
        self.posterior_mean_coef2 = as_t((1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp))
        # "Fixed large" variance of DiT models trained without learned sigma.
        self.fixed_log_variance = as_t(np.log(np.append(post_var[1], betas[1:]))
                                       if len(betas) > 1 else np.log(betas))

    def respaced(self, num_steps: int) -> "GaussianDiffusion":
        """A process over ``num_steps`` evenly spaced steps (e.g. 250 for DiT's sampler)."""
        if self.num_timesteps != NUM_TIMESTEPS:
            raise ValueError("respace the base (1000-step) process, not an already respaced one")
        return GaussianDiffusion(self.learn_sigma, space_timesteps(NUM_TIMESTEPS, num_steps))

    # -- forward process --------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, x_t, t):
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x0
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t)

    # -- model output -> distribution -------------------------------------------------

    def split_output(self, out: torch.Tensor, channels: int):
        """(eps, variance values or None) from the raw model output."""
        if self.learn_sigma:
            if out.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma expects {2 * channels} output channels, got {out.shape[1]}")
            return out[:, :channels], out[:, channels:]
        if out.shape[1] != channels:
            raise ValueError(
                f"model returns {out.shape[1]} channels for {channels}-channel data: "
                "did you mean learn_sigma=True?"
            )
        return out, None

    def p_mean_variance(self, out, x_t, t, clip_denoised: bool):
        eps, var_values = self.split_output(out, x_t.shape[1])
        if var_values is None:
            log_var = _extract(self.fixed_log_variance, t, x_t)
        else:
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = _extract(torch.log(self.betas), t, x_t)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0, eps

    def predict_x0(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def eps_from_x0(self, x_t, t, x0):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # -- training ---------------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this process -> the base timesteps the model was trained on."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t]

    def training_losses(self, model: Callable, x0: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor, noise: torch.Tensor | None = None,
                        mse_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses: ``mse`` (mean over pixels), ``vb`` (learned sigma only), ``loss``.

        ``mse_weights`` (per sample, e.g. :func:`min_snr_weights`) scale the MSE term only.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_timesteps(t), y)
        return self.losses_from_output(out, x0, x_t, t, noise, mse_weights)

    def losses_from_output(self, out, x0, x_t, t, noise, mse_weights=None) -> dict[str, torch.Tensor]:
        """The losses of :meth:`training_losses` for a model output computed by the caller."""
        eps, var_values = self.split_output(out, x0.shape[1])
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        terms = {"mse": mse}
        weighted = mse if mse_weights is None else mse * mse_weights
        if var_values is not None:
            # The bound trains only the variance: the mean is frozen (ADM's hybrid loss).
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, x_t, t)
            terms["loss"] = weighted + terms["vb"]
        else:
            terms["loss"] = weighted
        return terms

    def vb_terms(self, out, x0, x_t, t) -> torch.Tensor:
        """Variational-bound term in bits per dimension, per sample."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(out, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def eps_squared_error(self, model: Callable, x0, t, y, noise) -> torch.Tensor:
        """Per-pixel squared error of the predicted noise, shape (N, C, H, W) (analysis)."""
        x_t = self.q_sample(x0, t, noise)
        eps, _ = self.split_output(model(x_t, self.model_timesteps(t), y), x0.shape[1])
        return (noise - eps) ** 2

    # -- sampling ---------------------------------------------------------------------

    def sample(self, model, y: torch.Tensor, shape: tuple[int, ...], *, method: str = "ddpm",
               cfg_scale: float = 1.0, null_label: int | None = None, seed: int | None = 0,
               clip_denoised: bool = True, progress: bool = True, eta: float = 0.0,
               callback: Callable | None = None) -> torch.Tensor:
        """Draw samples for labels ``y``; every step of this (respaced) process is used.

        ``method``: "ddpm" (ancestral) or "ddim" (deterministic with ``eta=0``). With
        ``cfg_scale != 1`` the null label (``null_label``, default the model's
        ``num_classes``) gives the unconditional branch. Noise comes from a CPU generator
        seeded with ``seed``, so samples are the same on every device.
        ``callback(step_index, t, x_t)`` runs after every step (e.g. to record routing).
        """
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
        device = y.device
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        randn = lambda: torch.randn(shape, generator=gen).to(device)  # noqa: E731
        x = randn()
        model_fn = guided(model, cfg_scale, null_label)
        steps = list(range(self.num_timesteps))[::-1]
        schedule = [int(self.timestep_map[i]) for i in steps]
        with planned_run(model, schedule, getattr(model_fn, "labels", lambda labels: labels)(y)):
            for i in tqdm(steps, desc=f"{method} sampling", disable=not progress, leave=False):
                t = torch.full((shape[0],), i, device=device, dtype=torch.long)
                # The model's timesteps stay on the host: models move them to their device, and a
                # model that plans per timestep reads them without a device round-trip.
                t_model = torch.full((shape[0],), int(self.timestep_map[i]), dtype=torch.long)
                out = model_fn(x, t_model, y)
                mean, log_var, x0, eps = self.p_mean_variance(out, x, t, clip_denoised)
                noise = randn()
                if method == "ddpm":
                    nonzero = float(i > 0)
                    x = mean + nonzero * torch.exp(0.5 * log_var) * noise
                else:
                    eps = self.eps_from_x0(x, t, x0)
                    acp = _extract(self.alphas_cumprod, t, x)
                    acp_prev = _extract(self.alphas_cumprod_prev, t, x)
                    sigma = eta * torch.sqrt((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))
                    x = (x0 * torch.sqrt(acp_prev) + torch.sqrt(1 - acp_prev - sigma**2) * eps
                         + (float(i > 0) * sigma * noise))
                if callback is not None:
                    callback(len(steps) - 1 - i, int(self.timestep_map[i]), x)
            return x


@contextmanager
def planned_run(model, schedule: list[int], labels: torch.Tensor):
    """While open, ``model`` holds the plans of a sampling run over ``schedule`` (model
    timesteps, sampling order), made before its first step by those of its methods it has:
    ``plan_timesteps`` (a DyDiT's widths) and ``plan_conditioning`` (a DiT's adaLN modulation
    for the ``labels`` every call will carry; dropped when the run ends)."""
    plan = getattr(model, "plan_timesteps", None)
    if callable(plan):
        plan(schedule)
    plan_conditioning = getattr(model, "plan_conditioning", None)
    if callable(plan_conditioning):
        plan_conditioning(schedule, labels)
    try:
        yield
    finally:
        if callable(plan_conditioning):
            plan_conditioning(None)


# ---------------------------------------------------------------------------
# Classifier-free guidance, for any model(x, t, y)
# ---------------------------------------------------------------------------


def guide_doubled_output(out: torch.Tensor, channels: int, cfg_scale: float) -> torch.Tensor:
    """Guide the output of a batch whose first half is conditional and second half carries
    the null label: ``uncond + s * (cond - uncond)`` on the ``channels`` eps channels, written
    to both halves; the other channels (learned sigma) are kept as predicted.

    All eps channels are guided; the official code guides only the first three by default.
    """
    eps, rest = out[:, :channels], out[:, channels:]
    cond, uncond = eps.chunk(2)
    half = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half, half]), rest], dim=1)


def guided(model: Callable, cfg_scale: float, null_label: int | None = None) -> Callable:
    """``model`` itself when ``cfg_scale == 1``, else a callable ``(x, t, y)`` that runs the
    conditional and unconditional batch in one forward and returns the guided output.

    ``null_label`` defaults to ``model.num_classes`` (DiT's extra CFG row). Works for any
    callable with DiT's signature: wrappers need no guidance code of their own.
    """
    if cfg_scale == 1.0:
        return model
    null = getattr(model, "num_classes", None) if null_label is None else null_label
    if null is None:
        raise ValueError("cfg_scale != 1 needs null_label or a model with num_classes")

    doubled: list = [None, None]  # (y, its labels with the null half), made once per y

    def labels(y):
        """The labels the model is called with for ``y``: conditional, then null (one tensor
        per ``y``, so a model's plan for them is found by identity)."""
        if doubled[0] is not y:
            doubled[:] = [y, torch.cat([y, torch.full_like(y, null)])]
        return doubled[1]

    def fn(x, t, y):
        out = model(torch.cat([x, x]), torch.cat([t, t]), labels(y))
        return guide_doubled_output(out, x.shape[1], cfg_scale)[: len(x)]

    fn.labels = labels
    return fn

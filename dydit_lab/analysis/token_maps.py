"""Which tokens a DyDiT's token router (SDT) keeps over a sampling run: on the strokes of the
digit being generated or on the background around it.

A token is a *stroke* token when the final sample's pixels in its cell (the image split into
the token grid: 8x8 tokens of 4x4 pixels for the lab's 32x32 digits) are bright on average.
The keep maps come from a :class:`~dydit_lab.analysis.routing.RoutingTrace`; its final samples
may be VAE-decoded images, where the same rule splits bright cells from dark ones (not objects
from background).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from .common import patch_mean
from .routing import RoutingTrace

# The rule notebook 02 uses for stroke patches (about 10 % ink in a cell), so both notebooks'
# "stroke" name the same cells.
STROKE_THRESHOLD = -0.8


def _token_routing(trace) -> torch.Tensor:
    """``trace.tokens`` (S, B, depth, N), or a ``ValueError`` when the trace has none."""
    tokens = getattr(trace, "tokens", None)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4 or tokens.shape[-1] == 0:
        raise ValueError(f"{type(trace).__name__} has no token routing: need a RoutingTrace "
                         "from trace_sampling, whose tokens are (steps, samples, blocks, tokens)")
    return tokens


def token_cells(trace: RoutingTrace) -> tuple[int, int, int]:
    """(rows, columns, pixels per side of a cell) of the token grid over ``trace.samples``.

    Tokens are square patches, so the cell side is sqrt(H * W / N); it must divide H and W.
    """
    tokens = _token_routing(trace)
    H, W = trace.samples.shape[-2:]
    cell = math.isqrt(H * W // tokens.shape[-1])
    if cell == 0 or H % cell or W % cell or (H // cell) * (W // cell) != tokens.shape[-1]:
        raise ValueError(f"{tokens.shape[-1]} tokens do not tile {H}x{W} images in square cells")
    return H // cell, W // cell, cell


def stroke_tokens(trace: RoutingTrace, threshold: float = STROKE_THRESHOLD) -> torch.Tensor:
    """(B, rows, columns) bool: the tokens whose cell in the final sample has a mean pixel value
    (over the cell and the channels; images in [-1, 1], background -1) above ``threshold``."""
    samples, tokens = trace.samples, _token_routing(trace)
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples {tuple(samples.shape)} are no images (N, 1 or 3, H, W): "
                         "a latent model's trace needs a VAE to decode them (trace_sampling(vae=...))")
    if len(samples) != tokens.shape[1]:
        raise ValueError(f"{len(samples)} samples for the token routing of {tokens.shape[1]}")
    return patch_mean(samples, token_cells(trace)[2]) > threshold


def _blocks(tokens: torch.Tensor, layer: int | None) -> torch.Tensor:
    """``tokens`` (S, B, depth, N) of every block, or of block ``layer`` alone (depth 1)."""
    if layer is None:
        return tokens
    if not 0 <= layer < tokens.shape[2]:
        raise ValueError(f"layer {layer} out of range for {tokens.shape[2]} blocks")
    return tokens[:, :, layer:layer + 1]


def keep_maps(trace: RoutingTrace, layer: int | None = None) -> torch.Tensor:
    """(S, B, rows, columns): the share of blocks that keep each token (``layer=None``), or
    1 / 0 where block ``layer`` keeps / skips it."""
    tokens = _blocks(_token_routing(trace).float(), layer)
    rows, cols, _ = token_cells(trace)
    return tokens.mean(dim=2).reshape(*tokens.shape[:2], rows, cols)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> np.ndarray:
    """num / den, NaN where den is 0 (e.g. a run with no stroke token)."""
    den = torch.as_tensor(den, dtype=num.dtype).expand_as(num)
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.full_like(num, float("nan"))).numpy()


def token_stroke_share(trace: RoutingTrace, threshold: float = STROKE_THRESHOLD,
                       layer: int | None = None) -> pd.DataFrame:
    """Per sampling step, how SDT's kept tokens split between strokes and background.

    Stroke tokens: :func:`stroke_tokens` of the final sample. Every rate pools all
    (sample, block, token) triples of the step, over all blocks or only ``layer``:
    ``keep_stroke`` / ``keep_background`` = kept stroke / background triples over all stroke /
    background ones; ``kept_on_stroke`` = kept stroke triples over all kept ones;
    ``stroke_share`` = stroke tokens over all tokens (the same at every step: ``kept_on_stroke``
    above it means the router favours strokes). ``keep_stroke_by_position``: ``keep_stroke``
    had each sample's keep mask been the mean of the other samples' at that step and block,
    i.e. what the token positions alone explain (NaN with one sample).
    """
    tokens = _blocks(_token_routing(trace).double(), layer)
    stroke = stroke_tokens(trace, threshold).flatten(1).double()[None, :, None]  # (1, B, 1, N)
    B, blocks = tokens.shape[1], tokens.shape[2]
    kept = tokens.sum(dim=(1, 2, 3))  # (S,)
    kept_stroke = (tokens * stroke).sum(dim=(1, 2, 3))
    n_stroke, n_background = stroke.sum() * blocks, (1 - stroke).sum() * blocks
    others = (tokens.sum(dim=1, keepdim=True) - tokens) / max(B - 1, 1)  # leave-one-out mean mask
    by_position = (others * stroke).sum(dim=(1, 2, 3))
    return pd.DataFrame({
        "step": range(len(trace.timesteps)), "t": trace.timesteps,
        "keep_stroke": _ratio(kept_stroke, n_stroke),
        "keep_background": _ratio(kept - kept_stroke, n_background),
        "kept_on_stroke": _ratio(kept_stroke, kept),
        "stroke_share": float(stroke.mean()),
        "keep_stroke_by_position": _ratio(by_position, n_stroke) if B > 1 else np.nan,
    })


def stroke_share_summary(shares: Mapping[str, pd.DataFrame], bins: int = 4) -> pd.DataFrame:
    """Per-step keep rates (``shares``: name -> :func:`token_stroke_share` of a trace) averaged
    over the steps in ``bins`` equal ranges of t (each step counts once), one row per model
    and range, noisy end last."""
    rows = []
    for name, share in shares.items():
        edges = np.linspace(0, int(share["t"].max()) + 1, bins + 1).round().astype(int)
        for low, high in zip(edges[:-1], edges[1:]):
            inside = share[(share["t"] >= low) & (share["t"] < high)]
            if len(inside):
                means = inside.drop(columns=["step", "t"]).mean()
                rows.append({"model": name, "t": f"{low}-{high - 1}", "steps": len(inside), **means.to_dict()})
    return pd.DataFrame(rows)


def spread(total: int, count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over ``range(total)``, first and last included."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total)).round()})


def spaced_steps(trace: RoutingTrace, count: int = 8) -> list[int]:
    """``count`` sampling-step indices evenly spread from the first (noisiest) to the last."""
    return spread(len(trace.timesteps), count)

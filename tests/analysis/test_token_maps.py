"""Token keep maps over the final samples: stroke vs background tokens."""

import dataclasses
import math

import pytest
import torch

from dydit_lab.analysis.routing import RoutingTrace, width_schedule
from dydit_lab.analysis.token_maps import (STROKE_THRESHOLD, keep_maps, spaced_steps, stroke_share_summary,
                                           stroke_tokens, token_cells, token_stroke_share)
from tests.helpers import random_dydit


def hand_trace(samples, tokens, timesteps=None):
    """A RoutingTrace built by hand: ``samples`` (B, C, H, W), ``tokens`` (S, B, depth, N)."""
    S, B, depth, _ = tokens.shape
    return RoutingTrace(name="hand", timesteps=timesteps or [999 - i for i in range(S)],
                        labels=torch.arange(B), x_t=torch.zeros(S, B, 1, 4, 4), heads=torch.ones(S, B, depth, 2),
                        groups=torch.ones(S, B, depth, 2), tokens=tokens.float(), flops_fraction=torch.ones(S),
                        samples=samples, patch_size=4)


def two_digits():
    """Two 32x32 'digits' (8x8 tokens of 4x4 pixels) with known, disjoint stroke tokens, and
    three steps: keep exactly the strokes, keep everything, keep nothing (in both blocks)."""
    samples = -torch.ones(2, 1, 32, 32)
    samples[0, 0, 8:12, 12:20] = 1.0  # tokens (2, 3) and (2, 4)
    samples[1, 0, 20:28, 4:8] = 0.5  # tokens (5, 1) and (6, 1)
    stroke = torch.zeros(2, 8, 8, dtype=torch.bool)
    stroke[0, 2, 3:5] = True
    stroke[1, 5:7, 1] = True
    strokes_only = stroke.flatten(1)[:, None].expand(2, 2, 64)
    everything, nothing = torch.ones(2, 2, 64, dtype=torch.bool), torch.zeros(2, 2, 64, dtype=torch.bool)
    tokens = torch.stack([strokes_only, everything, nothing])
    return hand_trace(samples, tokens, [999, 500, 0]), stroke


def test_stroke_tokens_are_the_bright_cells():
    trace, stroke = two_digits()
    assert token_cells(trace) == (8, 8, 4)
    assert torch.equal(stroke_tokens(trace), stroke)


def test_threshold_on_a_cell_mean():
    """Default -0.8: a 4x4 cell with two ink pixels (mean -0.75) is stroke, with one (-0.875) not."""
    samples = -torch.ones(1, 1, 32, 32)
    samples[0, 0, 0, 0] = 1.0  # one ink pixel in token (0, 0)
    samples[0, 0, 0, 4:6] = 1.0  # two in token (0, 1)
    trace = hand_trace(samples, torch.ones(1, 1, 1, 64))
    stroke = stroke_tokens(trace)
    assert STROKE_THRESHOLD == -0.8 and stroke.sum() == 1 and stroke[0, 0, 1]
    assert stroke_tokens(trace, threshold=-0.9).sum() == 2


def test_keeping_exactly_the_strokes_gives_one_on_strokes_and_zero_on_background():
    trace, stroke = two_digits()
    share = token_stroke_share(trace)
    assert share["t"].tolist() == [999, 500, 0] and share["step"].tolist() == [0, 1, 2]
    area = stroke.float().mean().item()  # 4 stroke tokens of 128
    assert share["stroke_share"].tolist() == pytest.approx([area] * 3)
    kept_strokes, everything, nothing = share.to_dict("records")
    assert (kept_strokes["keep_stroke"], kept_strokes["keep_background"], kept_strokes["kept_on_stroke"]) == (1, 0, 1)
    assert (everything["keep_stroke"], everything["keep_background"]) == (1, 1)
    assert everything["kept_on_stroke"] == pytest.approx(area)  # keeping all: the strokes' area share
    assert (nothing["keep_stroke"], nothing["keep_background"]) == (0, 0)
    assert math.isnan(nothing["kept_on_stroke"])  # nothing kept: no share to give
    # Disjoint strokes: the other digit's mask keeps none of this one's strokes.
    assert share["keep_stroke_by_position"].tolist() == [0, 1, 0]


def test_rates_add_up_to_the_keep_rate_of_a_real_run(traces):
    samples = -torch.ones(3, 1, 32, 32)
    for i in range(3):
        samples[i, 0, :, 8 * i:8 * i + 8] = 1.0  # one column of stroke tokens, a different one per sample
    trace = dataclasses.replace(traces["model 0"], samples=samples)  # real routing, known strokes
    share = token_stroke_share(trace)
    assert len(share) == len(trace.timesteps) and share["stroke_share"][0] == 0.25
    overall = trace.tokens.double().mean(dim=(1, 2, 3)).numpy()
    assert (overall > 0).all()
    mix = share["keep_stroke"] * share["stroke_share"] + share["keep_background"] * (1 - share["stroke_share"])
    assert mix.to_numpy() == pytest.approx(overall)
    kept_on_stroke = share["keep_stroke"] * share["stroke_share"] / overall
    assert share["kept_on_stroke"].to_numpy() == pytest.approx(kept_on_stroke.to_numpy())


def test_one_block_is_the_trace_cut_to_that_block(traces):
    trace = traces["model 1"]
    alone = dataclasses.replace(trace, tokens=trace.tokens[:, :, 1:2])
    assert token_stroke_share(trace, layer=1).equals(token_stroke_share(alone))
    maps = keep_maps(trace)
    assert maps.shape == (5, 3, 4, 4)
    assert torch.equal(maps, trace.tokens.float().mean(dim=2).reshape(5, 3, 4, 4))
    assert torch.equal(keep_maps(trace, layer=0)[2, 1], trace.token_grid(2, 1, 0).float())
    with pytest.raises(ValueError, match="layer 2 out of range"):
        token_stroke_share(trace, layer=2)


def test_any_grid_that_tiles_the_image():
    trace, _ = two_digits()
    upsampled = trace.samples.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    decoded = dataclasses.replace(trace, samples=upsampled.expand(-1, 3, -1, -1))  # RGB, 64x64: 8 px cells
    assert token_cells(decoded) == (8, 8, 8)
    assert token_stroke_share(decoded)["keep_stroke"].tolist() == [1, 1, 0]
    wide = hand_trace(-torch.ones(1, 1, 32, 64), torch.ones(1, 1, 1, 32))  # 4x8 tokens of 8x8 pixels
    assert token_cells(wide) == (4, 8, 8) and keep_maps(wide).shape == (1, 1, 4, 8)


def test_bad_input_is_refused(traces):
    trace, _ = two_digits()
    with pytest.raises(ValueError, match="no token routing"):
        token_stroke_share(width_schedule(random_dydit(0), timesteps=[999, 0]))
    with pytest.raises(ValueError, match="do not tile"):
        token_stroke_share(dataclasses.replace(trace, samples=-torch.ones(2, 1, 30, 30)))
    with pytest.raises(ValueError, match="VAE"):
        token_stroke_share(dataclasses.replace(trace, samples=torch.zeros(2, 4, 32, 32)))  # latents
    with pytest.raises(ValueError, match="3 samples"):
        token_stroke_share(dataclasses.replace(trace, samples=-torch.ones(3, 1, 32, 32)))


def test_summary_averages_the_steps_of_each_range_of_t():
    trace, _ = two_digits()  # t = 999 (strokes only), 500 (all), 0 (none)
    summary = stroke_share_summary({"a": token_stroke_share(trace)}, bins=2)
    assert summary["t"].tolist() == ["0-499", "500-999"] and summary["steps"].tolist() == [1, 2]
    assert summary["keep_background"].tolist() == [0, 0.5] and summary["keep_stroke"].tolist() == [0, 1]
    assert summary["model"].tolist() == ["a", "a"]


def test_spaced_steps_span_the_run():
    trace = hand_trace(-torch.ones(1, 1, 32, 32), torch.ones(50, 1, 1, 64), list(range(980, -1, -20)))
    assert spaced_steps(trace, 8) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert spaced_steps(trace, 1) == [0] and len(spaced_steps(trace, 80)) == 50
    with pytest.raises(ValueError):
        spaced_steps(trace, 0)

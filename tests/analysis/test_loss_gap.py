"""Loss gap analysis (DyDiT Figure 1a): per-timestep loss of two models and their paired gap."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from dydit_lab.analysis.loss_gap import (loss_gap, pair_gaps, per_run_loss, per_timestep_loss,
                                         sample_image_indices, seed_gap, summarize_gap,
                                         summarize_seed_gap, timestep_noise)
from dydit_lab.diffusion import GaussianDiffusion
from tests.helpers import tiny_model


class ZeroEps(torch.nn.Module):
    """Predicts eps = 0, so its squared error is exactly noise**2."""

    patch_size = 8

    def forward(self, x, t, y):
        return torch.zeros_like(x)


class Recorder(torch.nn.Module):
    """Remembers every input it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append((x.clone(), t.clone(), y.clone()))
        return torch.zeros_like(x)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 32, 32, generator=gen) * 2 - 1
    return images, torch.arange(5) % 10


TS = [0, 400, 999]


def test_per_timestep_loss_shape_and_columns(batch):
    model = tiny_model()
    df = per_timestep_loss({"S": model, "L": tiny_model(1)}, *batch, timesteps=TS,
                           samples_per_t=3, batch_size=4, progress=False)
    assert list(df.columns) == ["model", "t", "sample", "mse"]
    assert len(df) == 2 * len(TS) * 3
    assert set(df["model"]) == {"S", "L"} and sorted(df["t"].unique()) == TS
    assert df.groupby(["model", "t"]).size().eq(3).all()
    assert (df["mse"] > 0).all() and np.isfinite(df["mse"]).all()
    assert not model.training


def test_per_timestep_loss_restores_training_mode(batch):
    model = tiny_model().train()
    per_timestep_loss({"m": model}, *batch, timesteps=[5], samples_per_t=2, progress=False)
    assert model.training


def test_zero_model_mse_is_mean_squared_noise(batch):
    images, labels = batch
    df = per_timestep_loss({"zero": ZeroEps()}, images, labels, timesteps=TS, samples_per_t=4,
                           batch_size=5, seed=3, progress=False)
    for t in TS:
        expected = timestep_noise(t, 4, images.shape[1:], seed=3).pow(2).mean(dim=(1, 2, 3))
        got = df[df["t"] == t].sort_values("sample")["mse"].to_numpy()
        np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-6)


def test_same_inputs_for_every_model(batch):
    images, labels = batch
    a, b = Recorder(), Recorder()
    per_timestep_loss({"a": a, "b": b}, images, labels, timesteps=TS, samples_per_t=3,
                      batch_size=4, progress=False)
    assert len(a.seen) == len(b.seen) > 1
    for (xa, ta, ya), (xb, tb, yb) in zip(a.seen, b.seen):
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and torch.equal(ya, yb)
    # and x_t is q_sample of the documented image with the documented noise
    x = torch.cat([s[0] for s in a.seen])
    idx = torch.from_numpy(sample_image_indices(len(TS), 3, len(images)).reshape(-1))
    noise = torch.cat([timestep_noise(t, 3, images.shape[1:]) for t in TS])
    t = torch.tensor(TS).repeat_interleave(3)
    torch.testing.assert_close(x, GaussianDiffusion().q_sample(images[idx], t, noise))
    assert torch.equal(torch.cat([s[2] for s in a.seen]), labels[idx])


def test_result_independent_of_batching(batch):
    model = tiny_model()
    full = per_timestep_loss({"m": model}, *batch, timesteps=TS, samples_per_t=3, batch_size=2,
                             progress=False)
    other = per_timestep_loss({"m": model}, *batch, timesteps=TS, samples_per_t=3, batch_size=64,
                              progress=False)
    np.testing.assert_allclose(full["mse"], other["mse"], rtol=1e-5)


def test_identical_models_give_zero_gap_and_band(batch):
    model = tiny_model()
    df = per_timestep_loss({"S": model, "L": copy.deepcopy(model)}, *batch, timesteps=TS,
                           samples_per_t=4, batch_size=5, progress=False)
    for smooth in (1, 3):
        gap = loss_gap(df, "S", "L", smooth=smooth)
        assert list(gap.columns[:7]) == ["t", "small", "large", "gap", "gap_lo", "gap_hi",
                                         "relative_gap"]
        assert (gap["gap"] == 0).all() and (gap["gap_lo"] == 0).all() and (gap["gap_hi"] == 0).all()
        assert (gap["relative_gap"] == 0).all()


def _fake_long(gaps, n=5, seed=0):
    """Long df with large loss 1 and small = 1 + gap(t) + paired noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for t, g in gaps.items():
        d = g + rng.normal(0, 0.1, n)
        for s in range(n):
            rows += [("L", t, s, 1.0), ("S", t, s, 1.0 + d[s])]
    return pd.DataFrame(rows, columns=["model", "t", "sample", "mse"])


def test_loss_gap_matches_paired_t_interval():
    df = _fake_long({0: 0.5, 1: 0.2, 2: 0.0, 3: -0.1})
    gap = loss_gap(df, "S", "L")
    for t in range(4):
        sub = df[df["t"] == t].pivot(index="sample", columns="model", values="mse")
        d = sub["S"] - sub["L"]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        row = gap[gap["t"] == t].iloc[0]
        assert row["gap"] == pytest.approx(d.mean())
        assert row["gap_lo"] == pytest.approx(d.mean() - half)
        assert row["gap_hi"] == pytest.approx(d.mean() + half)
        assert row["relative_gap"] == pytest.approx(d.mean() / 1.0)


def test_loss_gap_smoothing_is_centered_rolling_mean():
    df = _fake_long({t: 0.1 * t for t in range(6)})
    raw, smooth = loss_gap(df, "S", "L"), loss_gap(df, "S", "L", smooth=3)
    expected = raw["gap"].rolling(3, center=True, min_periods=1).mean()
    np.testing.assert_allclose(smooth["gap"], expected)
    # the band of a 3-point average is narrower than a single point's (interior rows)
    assert ((smooth["gap_hi"] - smooth["gap_lo"]) < (raw["gap_hi"] - raw["gap_lo"]))[1:-1].all()
    assert smooth.attrs["smooth"] == 3


def test_loss_gap_rejects_unknown_model():
    with pytest.raises(ValueError, match="not in"):
        loss_gap(_fake_long({0: 0.1}), "S", "XL")


def test_summarize_gap_quarters():
    df = _fake_long({t: (0.4 if t < 500 else 0.0) for t in range(0, 1000, 50)}, n=8)
    summary = summarize_gap(loss_gap(df, "S", "L"))
    assert list(summary["t_range"]) == ["0-249", "250-499", "500-749", "750-999"]
    assert list(summary["n_timesteps"]) == [5, 5, 5, 5]
    assert summary["gap"].iloc[0] == pytest.approx(0.4, abs=0.05)
    assert summary["gap"].iloc[3] == pytest.approx(0.0, abs=0.05)
    assert summary["gap_lo"].iloc[3] < 0 < summary["gap_hi"].iloc[3]  # gap vanishes here
    assert summary["gap_lo"].iloc[0] > 0 and summary["frac_t_significant"].iloc[0] == 1.0


def test_summarize_gap_of_smoothed_curve_has_no_band():
    df = _fake_long({t: 0.1 for t in range(0, 1000, 100)})
    with pytest.warns(UserWarning, match="smoothed"):
        summary = summarize_gap(loss_gap(df, "S", "L", smooth=3), bins=2)
    assert summary["gap_lo"].isna().all() and summary["gap"].notna().all()


# ---------------------------------------------------------------------------
# Several training runs per size: the between-seed band
# ---------------------------------------------------------------------------


def test_per_run_loss_pairs_every_run_on_the_same_inputs(batch, tmp_path):
    path = tmp_path / "small-seed1.pt"
    torch.save({"ema": tiny_model(1).state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    runs = {"S": [tiny_model(0), path], "L": [tiny_model(2), tiny_model(3)]}
    df = per_run_loss(runs, *batch, timesteps=TS, samples_per_t=3, batch_size=4, progress=False)
    assert list(df.columns) == ["model", "run", "t", "sample", "mse"]
    assert len(df) == 4 * len(TS) * 3
    assert df.groupby(["model", "run"]).size().eq(len(TS) * 3).all()
    assert df.attrs["runs"] == {"S": ["run 0", "small-seed1"], "L": ["run 0", "run 1"]}
    # each run's losses are what per_timestep_loss gives for that model alone (same x_t)
    alone = per_timestep_loss({"S": tiny_model(1)}, *batch, timesteps=TS, samples_per_t=3,
                              progress=False)
    got = df[(df["model"] == "S") & (df["run"] == 1)]["mse"].to_numpy()
    np.testing.assert_allclose(got, alone["mse"].to_numpy(), rtol=1e-5)


def test_per_run_loss_needs_runs(batch):
    with pytest.raises(ValueError, match="no checkpoints"):
        per_run_loss({"S": [tiny_model()], "L": []}, *batch, timesteps=TS, progress=False)


def _fake_runs(offsets_small, offsets_large, ts=range(4), n=6, seed=0):
    """Long df with runs: small run i has loss 1 + offsets_small[i] + paired noise, large run j
    1 + offsets_large[j] (+ the same per-sample noise, so evaluation noise is shared)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in ts:
        noise = rng.normal(0, 0.05, n)
        for s in range(n):
            rows += [("S", i, t, s, 1.0 + off + noise[s]) for i, off in enumerate(offsets_small)]
            rows += [("L", j, t, s, 1.0 + off) for j, off in enumerate(offsets_large)]
    return pd.DataFrame(rows, columns=["model", "run", "t", "sample", "mse"])


def test_seed_gap_band_is_min_max_over_all_pairs():
    df = _fake_runs([0.3, 0.5], [0.0, 0.1])  # pair gaps 0.3, 0.2, 0.5, 0.4 (+ noise)
    gap = seed_gap(df, "S", "L")
    assert gap.attrs["pairs"] == 4 and gap.attrs["runs"] == {"S": 2, "L": 2}
    pairs = pair_gaps(df, "S", "L")
    assert len(pairs) == 4 * 4 and set(zip(pairs["small_run"], pairs["large_run"])) == {
        (0, 0), (0, 1), (1, 0), (1, 1)}
    by_t = pairs.groupby("t")
    np.testing.assert_allclose(gap["seed_lo"], by_t["gap"].min())
    np.testing.assert_allclose(gap["seed_hi"], by_t["gap"].max())
    np.testing.assert_allclose(gap["relative_seed_hi"], by_t["relative_gap"].max())
    np.testing.assert_allclose(gap["seed_hi"] - gap["seed_lo"], 0.3, atol=1e-9)
    # the curve is the gap of the run averages, with its evaluation-noise interval
    mean = df.groupby(["model", "t", "sample"], as_index=False)["mse"].mean()
    plain = loss_gap(mean, "S", "L")
    np.testing.assert_allclose(gap["gap"], plain["gap"])
    np.testing.assert_allclose(gap["gap_lo"], plain["gap_lo"])
    assert (gap["seed_lo"] <= gap["gap"]).all() and (gap["gap"] <= gap["seed_hi"]).all()


def test_seed_gap_with_one_run_per_size_has_no_band():
    df = _fake_runs([0.3], [0.0])
    gap = seed_gap(df, "S", "L", smooth=3)
    assert gap.attrs["pairs"] == 1
    assert gap[["seed_lo", "seed_hi", "relative_seed_lo", "relative_seed_hi"]].isna().all().all()
    plain = loss_gap(df.drop(columns="run"), "S", "L", smooth=3)
    pd.testing.assert_frame_equal(gap[plain.columns], plain)
    # the output of per_timestep_loss (no run column) counts as one run each
    assert seed_gap(df.drop(columns="run"), "S", "L").attrs["pairs"] == 1


def test_seed_gap_smooths_the_pairs_like_the_curve():
    df = _fake_runs([0.3, 0.5], [0.0], ts=range(6))
    raw, smooth = seed_gap(df, "S", "L"), seed_gap(df, "S", "L", smooth=3)
    expected = raw["seed_hi"].rolling(3, center=True, min_periods=1).mean()  # one large run: max = run 1
    np.testing.assert_allclose(smooth["seed_hi"], expected)


def test_summarize_seed_gap_ranges_per_quarter():
    ts = range(0, 1000, 100)
    summary = summarize_seed_gap(_fake_runs([0.3, 0.5], [0.0, 0.1], ts=ts), "S", "L")
    assert list(summary["pairs"]) == [4] * 4
    np.testing.assert_allclose(summary["seed_lo"], 0.2, atol=0.05)
    np.testing.assert_allclose(summary["seed_hi"], 0.5, atol=0.05)
    one = summarize_seed_gap(_fake_runs([0.3], [0.0], ts=ts), "S", "L")
    assert one["seed_lo"].isna().all() and list(one["pairs"]) == [1] * 4
    assert one["gap"].notna().all()

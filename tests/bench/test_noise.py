"""The noise control (dydit_lab.bench.noise): a known ratio of 2 read with the bench's two
estimators, on a virtual clock where every forward's duration is set by the test, and from the CLI."""

import pytest
import torch

from dydit_lab.bench import run as bench_run
from dydit_lab.bench.noise import describe_noise, duration_control
from dydit_lab.bench.workload import BenchInputs
from dydit_lab.cli import main
from tests.helpers import BENCH_ARCH

STEPS, REPEATS = 3, 3


class VirtualClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class TimedModel:
    """A stand-in forward that advances the virtual clock by one unit plus ``extra(call)``."""

    def __init__(self, clock, extra=lambda call: 0.0):
        self.clock, self.extra, self.calls = clock, extra, 0

    def eval(self):
        return self

    def __call__(self, x, t, y):
        self.clock.now += 1.0 + self.extra(self.calls)
        self.calls += 1
        return x


@pytest.fixture
def clock(monkeypatch):
    clock = VirtualClock()
    monkeypatch.setattr(bench_run, "time", clock)  # _timed_call reads time.perf_counter
    return clock


def _inputs():
    return BenchInputs(x=[torch.zeros(2, 1)] * STEPS, t=[torch.zeros(2)] * STEPS, y=torch.zeros(2), timesteps=[0] * STEPS)


def test_on_an_idle_machine_both_estimators_read_the_known_ratio(clock):
    model = TimedModel(clock)
    result = duration_control(model, _inputs(), torch.device("cpu"), repeats=REPEATS)
    assert model.calls == (1 + REPEATS) * STEPS * 3  # warm-up and timed passes: once + twice per step
    assert result["median_pass_ratio"] == pytest.approx(2.0) and result["best_pass_ratio"] == pytest.approx(2.0)
    assert result["median_pass_error"] == pytest.approx(0.0) and result["best_pass_error"] == pytest.approx(0.0)
    assert result["once_pass_spread"] == 0 and result["once_forward_seconds"] == [1.0] * (REPEATS * STEPS)


def test_a_slow_pass_moves_the_spread_but_neither_ratio(clock):
    warm_up, per_pass = STEPS * 3, STEPS * 3
    model = TimedModel(clock, extra=lambda call: 0.5 if warm_up <= call < warm_up + per_pass else 0.0)
    result = duration_control(model, _inputs(), torch.device("cpu"), repeats=REPEATS)
    assert result["once_pass_spread"] == pytest.approx(0.5)  # the first timed pass ran 1.5x slower
    assert result["median_pass_ratio"] == pytest.approx(2.0) and result["best_pass_ratio"] == pytest.approx(2.0)


def test_contention_that_spares_short_forwards_shows_as_best_pass_error(clock):
    # Every forward but the single ones of the last pass is slowed by a quarter: the single
    # forwards found a quiet moment the double ones never did, so the best pass overstates 2.
    last_pass_start = (1 + REPEATS - 1) * STEPS * 3
    is_single = _single_calls(REPEATS)
    model = TimedModel(clock, extra=lambda call: 0.0 if call >= last_pass_start and is_single[call] else 0.25)
    result = duration_control(model, _inputs(), torch.device("cpu"), repeats=REPEATS)
    assert result["best_pass_ratio"] == pytest.approx(2.5) and result["best_pass_error"] == pytest.approx(0.25)
    assert result["median_pass_ratio"] == pytest.approx(2.0)  # median passes: both slowed alike
    assert "read 2.000 by the median pass (+0.0%) and 2.500 by the best pass (+25.0%)" in describe_noise(result)


def _single_calls(repeats):
    """Which forward calls, in order, are a path-"once" forward (warm-up: once per step first,
    then twice per step; timed: the two paths alternate first per step)."""
    calls = [True] * STEPS + [False] * (2 * STEPS)
    for _ in range(repeats):
        for step in range(STEPS):
            calls += [True, False, False] if step % 2 == 0 else [False, False, True]
    return calls


def test_the_cli_reads_this_machine(capsys):
    main(["bench", "--arch", BENCH_ARCH, "--batch-size", "2", "--steps", "2", "--threads", "1",
          "--device", "cpu", "--repeats", "2", "--profile", "noise"])
    out = capsys.readouterr().out
    assert out.startswith(f"{BENCH_ARCH}, batch 2, 2 steps")
    assert "passes of identical work spread" in out and "a known ratio of 2 read" in out

"""Collapse indicators of a fine-tune from its per-block routing log."""

import pandas as pd
import pytest

from dydit_lab.analysis.routing_health import health_table, read_routing_log, run_health
from dydit_lab.training.dydit import ROUTING_LOG_FIELDS


def write_log(folder, collapse_at=None, stuck_block=False):
    rows = []
    for step in (50, 100, 150, 200):
        for block in range(3):
            heads_min = 0.25 if collapse_at is not None and step >= collapse_at and block == 1 else 0.75
            tokens = 0.0 if stuck_block and block == 2 else 0.6
            rows.append({"step": step, "block": block, "heads": 0.8, "heads_min": heads_min, "groups": 0.7,
                         "groups_min": 0.5, "tokens": tokens, "tokens_low_t": tokens, "tokens_high_t": tokens / 2})
    folder.mkdir()
    pd.DataFrame(rows, columns=["step", *ROUTING_LOG_FIELDS]).to_csv(folder / "routing.csv", index=False)
    return folder


def test_a_healthy_and_a_collapsing_run_are_told_apart(tmp_path):
    table = health_table({"good": write_log(tmp_path / "good"),
                          "bad": write_log(tmp_path / "bad", collapse_at=100, stuck_block=True)}, num_heads=4)
    good, bad = table.loc["good"], table.loc["bad"]
    assert pd.isna(good["first_step_one_head"]) and bad["first_step_one_head"] == 100
    assert good["fewest_heads"] == 0.75 and bad["fewest_heads"] == 0.25
    assert good["blocks_tokens_stuck"] == 0 and bad["blocks_tokens_stuck"] == 1
    assert good["tokens_noisy_minus_clean"] == pytest.approx(-0.3) and good["blocks"] == 3
    assert good["steps_logged"] == 200


def test_end_state_uses_the_last_steps_only(tmp_path):
    log = read_routing_log(write_log(tmp_path / "run", collapse_at=200))
    assert run_health(log, num_heads=4, last_steps=50)["fewest_heads"] == 0.25
    assert run_health(log[log["step"] < 200], num_heads=4)["fewest_heads"] == 0.75


def test_missing_log_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="routing-log-every"):
        read_routing_log(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        health_table({}, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        run_health(read_routing_log(write_log(tmp_path / "run")), num_heads=0)

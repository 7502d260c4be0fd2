"""``python -m dydit_lab loss-per-t``: paired per-timestep losses of named checkpoints to a CSV."""

import pandas as pd
import pytest
import torch

from dydit_lab.analysis.commands import evenly_spaced_timesteps, parse_named_paths
from dydit_lab.cli import main


def test_named_paths_keep_their_order_and_reject_bad_items():
    assert list(parse_named_paths(["parent=a.pt", "dydit=dir/b=c.pt"]).items()) == [("parent", "a.pt"),
                                                                                     ("dydit", "dir/b=c.pt")]
    for bad, match in [(["a.pt", "b=b.pt"], "NAME=PATH"), (["a=", "b=b.pt"], "NAME=PATH"),
                       (["a=x.pt", "a=y.pt"], "twice"), (["a=x.pt"], "at least two")]:
        with pytest.raises(ValueError, match=match):
            parse_named_paths(bad)


def test_evenly_spaced_timesteps_are_bin_centres():
    assert evenly_spaced_timesteps(4) == [125, 375, 625, 875]
    assert evenly_spaced_timesteps(1000) == list(range(1000))
    with pytest.raises(ValueError, match="timesteps"):
        evenly_spaced_timesteps(0)


def test_loss_per_t_writes_paired_losses_and_prints_the_ratio(exported_parent, tmp_path, capsys):
    out = tmp_path / "loss.csv"
    main(["loss-per-t", "--model", f"parent={exported_parent}", "--model", f"same={exported_parent}",
          "--timesteps", "3", "--samples-per-t", "2", "--out", str(out), "--quiet"])
    table = pd.read_csv(out)
    assert list(table.columns) == ["model", "t", "sample", "mse"] and len(table) == 2 * 3 * 2
    assert sorted(table.t.unique()) == [166, 500, 833]
    parent, same = (table[table.model == m].mse.to_numpy() for m in ("parent", "same"))
    assert (parent > 0).all() and torch.allclose(torch.tensor(parent), torch.tensor(same))  # paired inputs
    printed = capsys.readouterr().out
    assert "relative to 'parent'" in printed and "same: t 166-166 1.00x" in printed


def test_loss_per_t_needs_two_models(exported_parent, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["loss-per-t", "--model", f"parent={exported_parent}", "--out", str(tmp_path / "x.csv")])
    assert "at least two" in capsys.readouterr().err
